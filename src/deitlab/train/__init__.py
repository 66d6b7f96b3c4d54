"""Training: the DeiT recipe engine, distillation losses, distributed set-up.

The names below are imported from their modules on first use, so that ``deitlab.train.config``
(the configuration, read by the command line's ``--help``) loads without torch.
"""
import importlib

__all__ = ['ConfigError', 'TrainConfig', 'DistillationLoss', 'TrainingDiverged', 'evaluate', 'train']

_HOME = {'ConfigError': 'config', 'TrainConfig': 'config', 'DistillationLoss': 'distill',
         'TrainingDiverged': 'engine', 'evaluate': 'engine', 'train': 'engine'}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f'.{_HOME[name]}', __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(__all__))
