"""``deitlab pipeline FILE.yaml``: several deitlab commands in a row (train -> prune -> fuse ->
export, ...), each step's output the next one's input, every step measured and all of them on one
report page.

``spec.py`` reads the file and resolves each step into the command it runs (checked with that
command's own parser, and its settings with its own configuration class, before anything runs);
``run.py`` runs the steps as ``python -m deitlab ... --json`` subprocesses, keeps a record per step
(``OUT/NN-name.step.json``), skips the steps a re-run finds done, stops at the first failure with the
completed steps kept, and writes ``OUT/pipeline.json`` and the report (:func:`deitlab.report.write_report`).
:class:`PipelineError` is torch- and YAML-free; the other names are imported from their modules on
first use.
"""
from ..lazy import lazy_exports


class PipelineError(ValueError):
    """A pipeline file that cannot be run (unknown step kinds or options, a value its command
    refuses, no model for a step to read), or a step that failed, with the step and the reason."""


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during a step; the message says which steps are kept and how to go on."""


_HOME = {'Pipeline': 'spec', 'Step': 'spec', 'KINDS': 'spec', 'load_pipeline': 'spec', 'run_pipeline': 'run',
         'plan_pipeline': 'run', 'subprocess_runner': 'run', 'StepRun': 'run'}
__all__ = sorted([*_HOME, 'PipelineError', 'PipelineInterrupted'])
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
