"""``deitlab report``: every model of some run directories and benchmark result files on one
self-contained HTML page -- top-1 against GMACs and against measured latency with the Pareto fronts,
a sortable table, per-model widths, training curves and configurations, and the machine and settings
the numbers come from.

``records.py`` (:class:`ModelRecord`, :func:`pareto_front`, :class:`ReportError`), ``adapters.py``
(the benchmark result files) and ``runs.py``'s readers are torch-free; ``runs.measure_runs`` builds
the models (GMACs, parameters, ``--measure``d latency); ``page.py`` draws the page with plotly;
``build.py`` holds :func:`write_report`. The names below are imported from their modules on first
use.
"""
from ..lazy import lazy_exports

_HOME = {'ReportError': 'records', 'ModelRecord': 'records', 'pareto_front': 'records', 'front_of': 'records',
         'KINDS': 'adapters', 'read_benchmark_json': 'adapters', 'read_run_dir': 'runs', 'find_run_dirs': 'runs',
         'measure_runs': 'runs', 'render_page': 'page', 'write_report': 'build', 'collect_records': 'build'}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
