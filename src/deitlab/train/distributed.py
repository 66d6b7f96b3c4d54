"""Re-export of :mod:`deitlab.distributed` (process-group set-up, seeding, all-reduce), which
lives below ``train`` so that evaluation and data code can use it without importing the engine."""
from ..distributed import DistInfo, all_reduce_sum, barrier, init_distributed, resolve_device, seed_all

__all__ = ['DistInfo', 'all_reduce_sum', 'barrier', 'init_distributed', 'resolve_device', 'seed_all']
