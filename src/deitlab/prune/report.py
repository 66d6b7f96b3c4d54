"""What a pruning run bought: accuracy, params, GMACs, measured and predicted speed-up, and the
per-block widths against the dense model (NViT's "parameter redistribution" picture). Widths and
closed-form GMACs come from the model's layout (families.py), so a pruned PoolFormer / SpectFormer
reports its MLP widths only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.nn as nn

from .families import PruneError, layout_of

WIDTH_PANELS = (('num_heads', 'heads'), ('qk_dim', 'QK dim / head'), ('v_dim', 'V dim / head'),
                ('mlp_hidden', 'MLP hidden'))


def widths_of(model: nn.Module) -> dict:
    """The model's widths in the vocabulary of ``Masks.kept()`` (``layout_of(model).widths()``)."""
    return layout_of(model).widths()


def plot_widths(dense: dict, pruned: dict, path, title: str = '') -> Path:
    """Bars of heads, QK dim, V dim and MLP width per block, dense (grey) against pruned (only the
    widths the model has: MLP width for PoolFormer / SpectFormer)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(key, label) for key, label in WIDTH_PANELS if key in dense]
    depth = len(dense[panels[0][0]])
    x = np.arange(depth)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels) + (3 if len(panels) == 1 else 0), 3.3),
                             squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(x, dense[key], color='0.82', label='dense')
        ax.bar(x, pruned[key], color='tab:blue', width=0.55, label='pruned')
        ax.set_title(label)
        ax.set_xlabel('block')
        ax.set_xticks(x)
        ax.grid(axis='y', alpha=.3)
    axes[0].legend(fontsize=8)
    if 'embed_dim' in dense:
        title = f'{title}  embedding {dense["embed_dim"]} -> {pruned["embed_dim"]}'
    fig.suptitle(title.strip())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_rows(models: dict, baseline: str, batch_size: int, lut=None, quick: bool = False,
               rounds: Optional[int] = None) -> list:
    """``bench.compare`` rows (interleaved, one process) plus the LUT's predicted speed-up."""
    from ..bench import compare
    rows = compare(models, baseline, batch_size=batch_size, quick=quick, rounds=rounds)
    if lut is not None:
        family = layout_of(models[baseline]).family
        base_ms = lut.model_ms(widths_of(models[baseline]))
        for r in rows:   # the table describes the baseline's family only
            m = models[r['name']]
            same = _family(m) == family
            r['predicted_speedup'] = base_ms / lut.model_ms(widths_of(m)) if same else None
    return rows


def _family(model: nn.Module) -> Optional[str]:
    try:
        return layout_of(model).family
    except PruneError:
        return None


def finish_report(cfg, out: Path, dense: nn.Module, final: nn.Module, pruner, val_loader, device,
                  extra: Optional[dict] = None) -> dict:
    from ..bench import count_params, format_table
    from ..train.engine import evaluate

    acc = {name: evaluate(m, val_loader, device, progress=False)['top1'] for name, m in (('dense', dense),
                                                                                      ('nvit', final))}
    rows = []
    if cfg.measure:
        rows = speed_rows({'dense': dense, 'nvit': final}, 'dense', cfg.lut_batch, pruner.lut)
    else:
        for name, m in (('dense', dense), ('nvit', final)):
            rows.append(dict(name=name, params_m=count_params(m) / 1e6, gmacs=layout_of(m).gmacs()))
    for r in rows:
        r['top1'] = acc[r['name']]
    dw, pw = widths_of(dense), widths_of(final)
    plot = plot_widths(dw, pw, out / 'widths.png', title=f'NViT {pruner.budget.kind} target {pruner.budget.target}')
    report = dict(rows=rows, dense_widths=dw, pruned_widths=pw, target=dict(kind=pruner.budget.kind,
                  value=pruner.budget.target), estimate=pruner.estimate(), plot=str(plot), run_dir=str(out),
                  **(extra or {}))
    (out / 'report.json').write_text(json.dumps(report, indent=2, default=str))
    cols = ['name', 'top1', 'params_m', 'gmacs', 'latency_ms', 'images_per_s', 'latency_speedup',
            'throughput_ratio', 'predicted_speedup']
    report['table'] = format_table(rows, [c for c in cols if any(c in r for r in rows)])
    return report
