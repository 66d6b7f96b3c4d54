"""Measuring models: parameters, GMACs (counted and in closed form), latency, throughput, peak
memory, side-by-side comparisons and report tables.

Every number comes with the settings it was measured with, and speed claims are ratios taken
in one process run (``compare``)::

    import timm, deitlab
    from deitlab.bench import benchmark_model, compare, format_table
    model = timm.create_model('deitlab_deit_nano_patch4_32', img_size=28, in_chans=1)
    print(benchmark_model(model, quick=True)['gmacs'])
"""
from .common import fused_attention, fused_attn_state, resolve_input_size
from .flops import CONVENTIONS, analytic_gmacs, analytic_macs, block_macs, count_gmacs, count_params
from .memory import measure_memory, peak_memory_mb
from .report import format_benchmark, format_table, plot_tradeoff
from .speed import compare, measure_latency, measure_throughput
from .summary import MODELS_COLUMNS, MODELS_DIGITS, benchmark_model, gmacs_pair, models_table

__all__ = [
    'count_params', 'count_gmacs', 'analytic_gmacs', 'analytic_macs', 'block_macs', 'CONVENTIONS',
    'measure_latency', 'measure_throughput', 'measure_memory', 'peak_memory_mb',
    'benchmark_model', 'compare', 'models_table', 'gmacs_pair', 'MODELS_COLUMNS', 'MODELS_DIGITS',
    'format_table', 'format_benchmark', 'plot_tradeoff',
    'resolve_input_size', 'fused_attention', 'fused_attn_state',
]
