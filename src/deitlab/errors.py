"""The error types that mean bad input (reported to the user as a message, not a traceback)."""
from .data import DataError
from .distributed import DeviceError
from .explain import ExplainError
from .export.config import ExportError
from .nas.space import SearchSpaceError
from .papyri.config import PapyriError
from .pipeline import PipelineError
from .prune.base import PruneError
from .report.records import ReportError
from .rundir import ModelLoadError
from .share import ShareError
from .tokens.config import TokenFusionError
from .train.config import ConfigError
from .train.loop import TrainingDiverged

USER_ERRORS = (DataError, ModelLoadError, ConfigError, TrainingDiverged, PruneError, TokenFusionError, DeviceError,
               ExplainError, SearchSpaceError, PapyriError, ExportError, ReportError,
               ShareError, PipelineError)
