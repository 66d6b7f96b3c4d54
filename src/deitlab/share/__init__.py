"""Sharing run directories on the Hugging Face Hub: ``deitlab push RUN REPO_ID`` and ``deitlab pull
REPO_ID --out RUN``.

A pushed repository holds what timm's ``hf-hub:`` loader reads (``config.json`` with ``architecture``,
``pretrained_cfg`` and ``model_args``; ``model.safetensors``), the run's records (``train_config.json``,
``metrics.jsonl``, ``summary.json``, ``report.json``, ``arch.json``, ``widths.png``, those present) and
a generated model card (``README.md``). So, once ``import deitlab`` has registered deitlab's
architectures, ``timm.create_model('hf-hub:REPO_ID', pretrained=True)`` rebuilds the model, and ``deitlab
pull`` turns the repository back into a run directory.

``card.py`` (torch-free) reads a run's records and writes the card; ``hub.py`` checks the input,
stages the folder and talks to the Hub through ``huggingface_hub`` (imported when a command runs).
The names below are imported from their modules on first use.
"""
from ..lazy import lazy_exports


class ShareError(ValueError):
    """Bad input to push or pull (a run directory, repository id, output directory or credentials
    that cannot be used), or the Hub's refusal, with the reason."""


_HOME = {'model_card': 'card', 'run_records': 'card', 'push_run': 'hub', 'pull_run': 'hub', 'stage_run': 'hub',
         'check_repo_id': 'hub', 'RECORDS': 'card'}
__all__ = sorted([*_HOME, 'ShareError'])
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
