"""Training: the DeiT recipe engine, distillation losses, distributed set-up, DCAL's branches.

The names below are imported from their modules on first use, so that ``deitlab.train.config``
(the configuration, read by the command line's ``--help``) loads without torch.
"""
from ..lazy import lazy_exports

__all__ = ['ConfigError', 'TrainConfig', 'DistillationLoss', 'TrainingDiverged', 'evaluate', 'train', 'DCAL',
           'dcal_inference_gmacs']

_HOME = {'ConfigError': 'config', 'TrainConfig': 'config', 'DistillationLoss': 'distill',
         'TrainingDiverged': 'engine', 'evaluate': 'engine', 'train': 'engine', 'DCAL': 'dcal',
         'dcal_inference_gmacs': 'dcal'}
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
