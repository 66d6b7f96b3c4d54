"""Compute, write or check ``tests/data/golden_behaviour.npz``: golden results of deitlab's models,
training loop, NViT pruning and token fusion, which ``tests/test_golden.py`` demands bit for bit.

The file pins today's behaviour so that a refactor (of the training loop, the layers, the
registries, ...) can prove it changed nothing: every number below must come out identical, on
one CPU thread with fixed seeds. The computations live here, in one function per case
(:data:`CASES`), and the test imports them, so the test and this script cannot drift apart.

Regenerate (only when a change of behaviour is intended, and say so in the commit)::

    python tests/data/make_golden_behaviour.py            # write tests/data/golden_behaviour.npz
    python tests/data/make_golden_behaviour.py --out PATH # write elsewhere
    python tests/data/make_golden_behaviour.py --check    # compare a fresh run with the file (writes nothing)

Writing runs every case twice in one process and refuses to write unless both runs are
identical. ``--check`` prints every key that differs, is missing or is extra, and exits 1 if any.
The committed file was made on an x86-64 CPU with torch 2.14.1 and timm 1.0.31 (``meta.versions``
lists them with numpy, PIL and matplotlib, whose bundled fonts the glyph data draws); other
versions of these, or a CPU with other vector instructions, may legitimately change the low bits:
then regenerate on the old code first, and compare the refactor against that. The file records the
vector instructions torch used (``meta.cpu_capability``, e.g. AVX2 or AVX512): on a CPU where torch
picks the same, the test demands every bit; on another, the low bits of the floating-point sums
legitimately differ, and the test demands every float within ``CLOSE_RTOL`` of its array's largest
magnitude (floor 1e-3), NaN and infinity where they were, everything else identical (:func:`close`).
Measured between AVX512 and AVX2 builds: at most 2e-6 of the array's scale.

What is recorded (keys are ``<case>.<what>``; every case runs under :func:`deterministic`: one
thread, ``torch.manual_seed(0)``, the previous thread count restored afterwards):

* ``models.<name>``: every deitlab family in its smallest variant (:data:`MODELS`: DeiT, DeiT
  distilled, PoolFormer, SpectFormer, SpectFormer-H, STViT, STViT distilled), built with
  ``timm.create_model(name)`` right after ``torch.manual_seed(0)``: the eval-mode ``logits`` of
  :func:`images` (2 seeded ``randn`` images at the model's input size); the initial weights
  (``init.*``, see below); for distilled models the two heads in distilled training mode
  (``heads``, 2 x batch x classes).
* ``train.<config>``: ``train(TrainConfig(...))`` on ``glyphs:train=64,val=32,size=32,seed=0``,
  2 epochs of 2 steps of batch 8 (:data:`TRAIN_BASE`, warm-up, cosine schedule, drop path,
  label smoothing, light augmentation, one evaluation and one checkpoint per epoch) in the
  configurations of :data:`TRAIN_CONFIGS`: plain; Mixup/CutMix; soft distillation; hard
  distillation of a distilled student; MCTF with its consistency loss; ToMe; TransMix; MixPro;
  EMA with gradient clipping and the noise defence; PGD adversarial training. The teacher is a
  seeded random DeiT-pico saved as a run directory. Stored: the final weights (``weights.*``,
  from ``model.safetensors``), the EMA weights when on (``ema.*``), and the numeric columns of
  ``metrics.jsonl`` (``metrics``, epochs x ``metric_names``; losses, learning rate, accuracy,
  mixing statistics; no timings).
* ``prune.ofb``: ``prune_ofb(OFBConfig(...))`` of a seeded random DeiT-pico (:data:`OFB`: 6 search
  steps fast enough to eliminate and shrink, PMIM on, a 2-step fine-tune): the searched widths,
  per trace row the expected width of every module, the MACs and budget fractions and lambda, and
  the candidates eliminated, the step / shrink / forced counts, the fine-tune's metrics, and the
  searched and final weights.
* ``prune.nvit``: ``prune_nvit(NViTConfig(...))`` of a seeded random DeiT-pico (24 classes,
  saved as a run directory) to 0.5 of its GMACs with the committed latency table
  ``deit_pico_patch4_32_b64_t2`` in the ranking (lam 0.02), a linear schedule over 4 steps with an
  event every step, then 2 fine-tuning steps; no timing (``measure=False``). Stored: the widths
  (``widths``: rows num_heads, qk_dim, v_dim, mlp_hidden per block; ``embed_dim``) of the dense
  and pruned model and after every event, the units removed at every event (``removed``, JSON in
  removal order), every event's loss and estimate (``events``, ``event_names``), the final
  estimate and predicted speed-up, the densified weights before fine-tuning (``pruned.*``) and
  the final fine-tuned weights (``final.*``), and the fine-tune's metrics.
* ``tokens.<setting>``: ToMe, MCTF (one-step-ahead, precise, previous, max pooling), MCTF-Fast
  on DeiT-nano, ToMe/MCTF on the distilled DeiT-pico and MCTF on SpectFormer-pico
  (:data:`TOKEN_SETTINGS`), random init after ``torch.manual_seed(0)``, eval mode, source tracing
  on: the ``logits`` of :func:`images`, the tokens entering each block and leaving the last
  (``tokens``, from ``token_fusion_of(model).last``), the schedule (``schedule``: tokens in, r,
  tokens out per fused block), the final token ``size`` (B x T) and ``groups`` (for each input
  token, the final token holding it), and the closed-form ``gmacs``.
* ``tokens.functions``: pure functions of the token machinery: ``token_schedule`` for the r forms
  (constant, (r, inflect), fraction, list, MCTF clamps, two protected tokens), and the
  ``bipartite_plan`` slots (ToMe's one pass, MCTF's bidirectional two passes) of the
  ``cosine_scores`` of seeded tokens with their ``merge_weighted`` fusion of other seeded tokens.

Determinism: nothing needed a tolerance. Data loading runs in the main process (``workers=0``
for training; the NViT loaders use none), every random draw comes from a seeded generator or the
seeds ``train`` and ``prune_nvit`` set themselves, and writing the file checks two runs in one
process against each other. Run directories go to a temporary directory (the test's
``tmp_path``); their paths do not enter any result.

Weights (``<prefix>.names`` / ``.stats`` / ``.head``) are stored per tensor of the state dict,
sorted by name: numel, the sum and the sum of squares of its float64 values (``math.fsum``,
exactly rounded, so independent of any summation order), and its first 8 values (zero-padded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().with_name('golden_behaviour.npz')
DATA = 'glyphs:train=64,val=32,size=32,seed=0'
PICO = 'deitlab_deit_pico_patch4_32'
PICO_DIST = 'deitlab_deit_pico_distilled_patch4_32'
NANO = 'deitlab_deit_nano_patch4_32'
SPECT_PICO = 'deitlab_spectformer_pico_patch4_32'
HEAD = 8                 # first values stored per weight tensor
TEACHER = '<teacher>'    # replaced by the teacher run directory

# The smallest variant of every family deitlab registers with timm.
MODELS = (
    PICO,
    PICO_DIST,
    'deitlab_poolformer_pico_32',
    SPECT_PICO,
    'deitlab_spectformer_h_pico_32',
    'deitlab_stvit_pico_patch4_32',
    'deitlab_stvit_pico_distilled_patch4_32',
)

TRAIN_BASE = dict(model=PICO, data=DATA, epochs=2, max_steps_per_epoch=2, batch_size=8, lr=1e-3,
                  warmup_epochs=0.5, mix='none', mixup=0.0, cutmix=0.0, drop_path=0.1, smoothing=0.1,
                  aug='light', workers=0, seed=0, device='cpu', tensorboard=False, progress=False)
TRAIN_CONFIGS = {
    'plain': {},
    'mixing': dict(mix='mixup-cutmix', mixup=0.8, cutmix=1.0),
    'distill_soft': dict(teacher=TEACHER, distill='soft', distill_tau=2.0),
    'distill_hard': dict(model=PICO_DIST, teacher=TEACHER, distill='hard'),
    # gate 0.045 (just above 1/24): some samples of the untrained model pass it, some do not
    'mctf': dict(token_fusion='mctf', r='8', r_teacher_max=4, consistency_gate=0.045),
    'tome': dict(token_fusion='tome', r='8'),
    'transmix': dict(mix='transmix', mixup=0.8, cutmix=1.0),
    'mixpro': dict(mix='mixpro', mixup=0.8, cutmix=1.0),
    'ema_clip_noise': dict(ema=True, ema_decay=0.9, grad_clip=0.5, defence='noise:std=0.25'),
    'adv': dict(defence='adv:eps=4,steps=2'),
}

NVIT = dict(target_gmacs=0.5, lut='deit_pico_patch4_32_b64_t2', lam=0.02, schedule='linear', prune_steps=4,
            interval=1, batch_size=16, finetune_epochs=1, finetune_steps=2, val_batches=0, measure=False,
            progress=False, seed=0, device='cpu')
WIDTH_ROWS = ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden')
# a search fast enough to eliminate candidates and shrink modules in a few steps, with PMIM
OFB = dict(target_gmacs=0.5, search_steps=6, arch_lr=0.3, batch_size=16, finetune_epochs=1, finetune_steps=2,
           measure=False, progress=False, seed=0, device='cpu')

# name: (model, method, r (None: the method's default), options)
TOKEN_SETTINGS = {
    'tome': (NANO, 'tome', None, {}),
    'tome_inflect': (NANO, 'tome', (6, 1.0), {}),
    'tome_no_prop_attn': (NANO, 'tome', 6, dict(prop_attn=False)),
    'mctf': (NANO, 'mctf', None, {}),
    'mctf_fast': (NANO, 'mctf-fast', None, {}),
    'mctf_precise': (NANO, 'mctf', 8, dict(mode='precise')),
    'mctf_previous': (NANO, 'mctf', 8, dict(mode='previous', pooling='size')),
    'mctf_max_one_way': (NANO, 'mctf', 8, dict(pooling='max', bidirectional=False)),
    'tome_distilled': (PICO_DIST, 'tome', 8, {}),
    'mctf_distilled': (PICO_DIST, 'mctf', 8, {}),
    'mctf_spectformer': (SPECT_PICO, 'mctf', 8, {}),
}
# token_schedule(tokens, depth, r, protected, method, layers)
SCHEDULES = {
    'tome_const': (65, 6, 8, 1, 'tome', None),
    'tome_inflect': (197, 12, (8, 1.0), 1, 'tome', None),
    'tome_decreasing': (197, 12, (8, -1.0), 1, 'tome', None),
    'tome_list': (65, 4, [40, 10, 5, 1], 1, 'tome', None),
    'tome_distilled': (66, 4, 12, 2, 'tome', None),
    'mctf': (197, 12, 16, 1, 'mctf', list(range(1, 12))),
    'mctf_fast': (197, 12, 0.35, 1, 'mctf', [3, 6, 9]),
    'mctf_clamp': (65, 6, 16, 1, 'mctf', list(range(1, 6))),
}


@contextlib.contextmanager
def deterministic(seed: int = 0):
    """One CPU thread and ``torch.manual_seed(seed)`` inside; the thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def images(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``batch`` seeded standard-normal images at the model's input size."""
    from deitlab.bench import resolve_input_size
    return torch.randn(batch, *resolve_input_size(model), generator=torch.Generator().manual_seed(seed))


def weight_stats(prefix: str, tensors: dict) -> Dict[str, np.ndarray]:
    """``prefix.names``, ``prefix.stats`` (numel, sum, sum of squares in float64, exactly rounded)
    and ``prefix.head`` (the first ``HEAD`` values, float32, zero-padded) of every tensor."""
    names = sorted(tensors)
    stats = np.zeros((len(names), 3), dtype=np.float64)
    head = np.zeros((len(names), HEAD), dtype=np.float32)
    for i, name in enumerate(names):
        t = tensors[name].detach().cpu().reshape(-1)
        v = t.to(torch.float64).numpy()
        # a float32 squared is exact in float64; fsum rounds the exact total once
        stats[i] = (v.size, math.fsum(v.tolist()), math.fsum((v * v).tolist()))
        head[i, :min(HEAD, v.size)] = t[:HEAD].to(torch.float32).numpy()
    return {f'{prefix}.names': np.array(names), f'{prefix}.stats': stats, f'{prefix}.head': head}


def _rows(path: Path, drop=('epoch_time_s', 'epoch_cpu_s', 'train_img_per_s', 'time_s')) -> tuple:
    """The numeric columns of a JSON-lines file (timings dropped): names and a float64 table (NaN
    where a row lacks a column, e.g. MixPro's statistics in an epoch without a MixPro batch)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = list(dict.fromkeys(k for r in rows for k, v in r.items() if k not in drop and isinstance(v, (int, float))))
    return np.array(names), np.array([[float(r.get(k, 'nan')) for k in names] for r in rows], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def compute_model(name: str) -> Dict[str, np.ndarray]:
    """Logits, initial weights and (distilled models) both heads of ``name`` at seed 0."""
    import timm
    import deitlab  # noqa: F401  (registers the deitlab_* names)
    key = f'models.{name}'
    with deterministic(0):
        model = timm.create_model(name).eval()
        x = images(model)
        with torch.no_grad():
            out = {f'{key}.logits': model(x).numpy()}
        out.update(weight_stats(f'{key}.init', model.state_dict()))
        if hasattr(model, 'set_distilled_training'):
            model.set_distilled_training(True)
            model.train()
            with torch.no_grad():
                cls, dist = model(x)
            out[f'{key}.heads'] = torch.stack([cls, dist]).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def teacher_dir(workdir: Path) -> Path:
    """A seeded random DeiT-pico for the glyphs' 24 classes, saved as a run directory (once)."""
    import timm
    from deitlab.data.glyphs import GLYPH_CLASSES
    from deitlab.rundir import save_run_dir
    path = Path(workdir) / 'teacher'
    if not (path / 'model.safetensors').exists():
        with deterministic(1):
            model = timm.create_model(PICO, num_classes=len(GLYPH_CLASSES))
            save_run_dir(model, path, list(GLYPH_CLASSES))
    return path


def train_config(name: str, workdir: Path):
    from deitlab.train import TrainConfig
    kw = {**TRAIN_BASE, **TRAIN_CONFIGS[name], 'out': str(Path(workdir) / f'train_{name}')}
    if kw.get('teacher') == TEACHER:
        kw['teacher'] = str(teacher_dir(workdir))
    return TrainConfig(**kw)


def compute_train(name: str, workdir: Path) -> Dict[str, np.ndarray]:
    """Final weights (and EMA weights) and per-epoch metrics of training configuration ``name``."""
    from safetensors.torch import load_file
    from deitlab.train import train
    key = f'train.{name}'
    cfg = train_config(name, workdir)
    with deterministic(0):
        train(cfg)
    run = Path(cfg.out)
    out = weight_stats(f'{key}.weights', load_file(str(run / 'model.safetensors')))
    if cfg.ema:
        out.update(weight_stats(f'{key}.ema', load_file(str(run / 'ema' / 'model.safetensors'))))
    out[f'{key}.metric_names'], out[f'{key}.metrics'] = _rows(run / 'metrics.jsonl')
    return out


# ---------------------------------------------------------------------------------------------
# NViT pruning
# ---------------------------------------------------------------------------------------------

def _widths(w: dict) -> np.ndarray:
    return np.array([w[k] for k in WIDTH_ROWS], dtype=np.int64)


def _glyph_pico_dir(path: Path) -> Path:
    """A seeded random DeiT-pico for the glyph classes, saved as a run directory (call inside
    ``deterministic``)."""
    import timm
    from deitlab.data.glyphs import GLYPH_CLASSES
    from deitlab.rundir import save_run_dir
    return save_run_dir(timm.create_model(PICO, num_classes=len(GLYPH_CLASSES)), path, list(GLYPH_CLASSES))


def compute_prune(workdir: Path) -> Dict[str, np.ndarray]:
    """Widths, removed units, estimates and weights of a tiny NViT run (see the module docstring)."""
    from safetensors.torch import load_file
    from deitlab.prune import NViTConfig, prune_nvit
    key = 'prune.nvit'
    workdir = Path(workdir)
    with deterministic(0):
        dense = _glyph_pico_dir(workdir / 'nvit_dense')
        out_dir = workdir / 'nvit'
        report = prune_nvit(NViTConfig(model=str(dense), data=DATA, out=str(out_dir), **NVIT))
    log = [json.loads(line) for line in (out_dir / 'prune_log.jsonl').read_text().splitlines() if line.strip()]
    out = {
        f'{key}.dense_widths': _widths(report['dense_widths']),
        f'{key}.widths': _widths(report['pruned_widths']),
        f'{key}.embed_dim': np.array([report['dense_widths']['embed_dim'], report['pruned_widths']['embed_dim']]),
        f'{key}.event_widths': np.stack([_widths(r['widths']) for r in log]),
        f'{key}.event_embed_dim': np.array([r['widths']['embed_dim'] for r in log], dtype=np.int64),
        f'{key}.removed': np.array([json.dumps(r['removed']) for r in log]),
        f'{key}.estimate': np.array([report['estimate'][k] for k in ('gmacs', 'params', 'latency', 'latency_ms')]),
        f'{key}.predicted_speedup': np.array(report['prediction']['predicted_speedup'], dtype=np.float64),
        f'{key}.steps_events': np.array([report['prune_steps'], report['events']], dtype=np.int64),
        f'{key}.masked_vs_dense_max_abs': np.array(report['masked_vs_dense_max_abs'], dtype=np.float64),
    }
    out[f'{key}.event_names'], out[f'{key}.events'] = _rows(out_dir / 'prune_log.jsonl')
    out[f'{key}.finetune_metric_names'], out[f'{key}.finetune_metrics'] = _rows(out_dir / 'metrics.jsonl')
    out.update(weight_stats(f'{key}.pruned', load_file(str(out_dir / 'pruned' / 'model.safetensors'))))
    out.update(weight_stats(f'{key}.final', load_file(str(out_dir / 'model.safetensors'))))
    return out


def compute_ofb(workdir: Path) -> Dict[str, np.ndarray]:
    """Searched widths, the trace (expected widths, eliminated candidates) and the weights of a tiny
    OFB run (prune_ofb on a seeded random DeiT-pico, :data:`OFB`)."""
    from safetensors.torch import load_file
    from deitlab.prune.config import OFBConfig
    from deitlab.prune.ofb_search import prune_ofb
    key = 'prune.ofb'
    workdir = Path(workdir)
    with deterministic(0):
        dense = _glyph_pico_dir(workdir / 'ofb_dense')
        out_dir = workdir / 'ofb'
        report = prune_ofb(OFBConfig(model=str(dense), data=DATA, out=str(out_dir), **OFB))
    trace = json.loads((out_dir / 'search_trace.json').read_text())
    names = sorted(trace[0]['expected'])
    out = {
        f'{key}.widths': _widths(report['searched_widths']),
        f'{key}.embed_dim': np.array(report['searched_widths']['embed_dim'], dtype=np.int64),
        f'{key}.expected': np.array([[r['expected'][n] for n in names] for r in trace], dtype=np.float64),
        f'{key}.fractions': np.array([[r['macs_fraction'], r['budget_fraction'], r['lam']] for r in trace]),
        f'{key}.dropped': np.array([json.dumps(r['dropped'], sort_keys=True) for r in trace]),
        f'{key}.counts': np.array([report['search_steps'], report['shrinks'], report['forced_modules']], dtype=np.int64),
    }
    out[f'{key}.finetune_metric_names'], out[f'{key}.finetune_metrics'] = _rows(out_dir / 'metrics.jsonl')
    out.update(weight_stats(f'{key}.searched', load_file(str(out_dir / 'searched' / 'model.safetensors'))))
    out.update(weight_stats(f'{key}.final', load_file(str(out_dir / 'model.safetensors'))))
    return out


# ---------------------------------------------------------------------------------------------
# token fusion
# ---------------------------------------------------------------------------------------------

def compute_tokens(setting: str) -> Dict[str, np.ndarray]:
    """Logits and token plan of one ``TOKEN_SETTINGS`` entry."""
    import timm
    import deitlab  # noqa: F401
    from deitlab.tokens import token_fusion_of
    from deitlab.tokens.fuse import apply_token_fusion
    name, method, r, options = TOKEN_SETTINGS[setting]
    key = f'tokens.{setting}'
    with deterministic(0):
        model = timm.create_model(name).eval()
        x = images(model)
        apply_token_fusion(model, method, r, trace_source=True, **options)
        with torch.no_grad():
            logits = model(x)
        tf = token_fusion_of(model)
        last = tf.last
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        schedule = tf.schedule(tokens, len(model.blocks) - tf.start)
        source = last['source']
        assert torch.equal(source.sum(dim=1), torch.ones_like(source[:, 0])), 'a patch is in no or two tokens'
        return {
            f'{key}.logits': logits.numpy(),
            f'{key}.tokens': np.array(last['tokens'], dtype=np.int64),
            f'{key}.schedule': np.array([[s['tokens_in'], s['r'], s['tokens_out']] for s in schedule], dtype=np.int64),
            f'{key}.size': last['size'][..., 0].numpy(),
            f'{key}.groups': source.argmax(dim=1).to(torch.int16).numpy(),
            f'{key}.gmacs': np.array(tf.gmacs(model), dtype=np.float64),
        }


def compute_token_functions() -> Dict[str, np.ndarray]:
    """``token_schedule`` for :data:`SCHEDULES`; ``cosine_scores``, ``bipartite_plan`` and
    ``merge_weighted`` on seeded data."""
    from deitlab.tokens import token_schedule
    from deitlab.tokens.merge import bipartite_plan, cosine_scores, merge_weighted
    key = 'tokens.functions'
    out = {}
    with deterministic(0):
        for name, (tokens, depth, r, protected, method, layers) in SCHEDULES.items():
            sched = token_schedule(tokens, depth, r, protected, method, layers)
            out[f'{key}.schedule.{name}'] = np.array([[s['tokens_in'], s['r'], s['tokens_out']] for s in sched],
                                                     dtype=np.int64)
        g = torch.Generator().manual_seed(0)
        p, T = 1, 32
        scores = cosine_scores(torch.randn(2, T, 8, generator=g), p)
        x = torch.randn(2, T, 6, generator=g)
        w = torch.rand(2, T, 1, generator=g) + 0.5
        for name, r, bidirectional in (('one_pass', 5, False), ('bidirectional', 7, True)):
            plan = bipartite_plan(scores, r, p, bidirectional)
            out[f'{key}.plan.{name}.slot'] = plan.slot.numpy()
            out[f'{key}.plan.{name}.merged'] = merge_weighted(plan, x, w).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# all cases
# ---------------------------------------------------------------------------------------------

def _cases() -> Dict[str, Callable[[Path], Dict[str, np.ndarray]]]:
    cases: Dict[str, Callable[[Path], Dict[str, np.ndarray]]] = {}
    for name in MODELS:
        cases[f'models.{name}'] = lambda workdir, name=name: compute_model(name)
    for name in TRAIN_CONFIGS:
        cases[f'train.{name}'] = lambda workdir, name=name: compute_train(name, workdir)
    cases['prune.nvit'] = compute_prune
    cases['prune.ofb'] = compute_ofb
    for name in TOKEN_SETTINGS:
        cases[f'tokens.{name}'] = lambda workdir, name=name: compute_tokens(name)
    cases['tokens.functions'] = lambda workdir: compute_token_functions()
    return cases


#: case name -> function(workdir) returning {key: array}; every key starts with ``<case name>.``
CASES = _cases()


def compute_case(case: str, workdir: Path) -> Dict[str, np.ndarray]:
    """The arrays of one case; checks that they are all named after it."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    out = CASES[case](Path(workdir))
    bad = [k for k in out if not k.startswith(case + '.')]
    assert not bad, f'{case}: keys {bad} are not named after the case'
    return out


def compute_all(workdir: Path = None) -> Dict[str, np.ndarray]:
    """Every case's arrays, computed in ``workdir`` (a fresh temporary directory if None)."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return compute_all(Path(tmp))
    out: Dict[str, np.ndarray] = {}
    for case in CASES:
        out.update(compute_case(case, Path(workdir) / case))
    return out


def case_of(key: str) -> str:
    """The case a stored key belongs to (the longest case name it starts with)."""
    return max((c for c in CASES if key.startswith(c + '.')), key=len, default='')


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two arrays: dtype, shape and every value (floats as stored)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


CLOSE_RTOL = 1e-4   # a different CPU's low bits: 50x the largest difference measured between AVX2 and AVX512


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here (``AVX2``, ``AVX512``, ``DEFAULT``, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def exact_here(stored: Dict[str, np.ndarray]) -> bool:
    """Whether a golden file must match bit for bit here: torch picks the vector instructions it was
    made with."""
    return str(stored.get('meta.cpu_capability', '')) == cpu_capability()


def comparison(stored: Dict[str, np.ndarray]) -> str:
    """How a golden file is compared here, and why (see :func:`exact_here`)."""
    if exact_here(stored):
        return 'bit for bit'
    return (f'floats within {CLOSE_RTOL:g} of each array\'s scale: this CPU runs torch with {cpu_capability()}, '
            f'the file was made with {stored.get("meta.cpu_capability", "unrecorded")} vector instructions')


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equality up to another CPU's low bits: dtype and shape equal; non-float arrays bit for bit;
    floats NaN and infinity at the same places and every finite value within ``CLOSE_RTOL`` times
    the largest magnitude of ``b`` (at least 1e-3)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind != 'f':
        return same(a, b)
    fin, inf = np.isfinite(b), np.isinf(b)
    if not (np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[inf], b[inf]) and np.isfinite(a[fin]).all()):
        return False
    if not fin.any():
        return True
    scale = max(float(np.abs(b[fin]).max()), 1e-3)
    return float(np.abs(a[fin].astype(np.float64) - b[fin]).max()) <= CLOSE_RTOL * scale


def describe_difference(a: np.ndarray, b: np.ndarray) -> str:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return f'{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}'
    if a.dtype.kind in 'fiu':
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return f'{int((a != b).sum())} of {a.size} values differ, max abs difference {diff.max():.3g}'
    return f'{int((a != b).sum())} of {a.size} values differ'


def differences(fresh: Dict[str, np.ndarray], stored: Dict[str, np.ndarray], exact: bool = True) -> list:
    """One line per key that differs (bit for bit; with ``exact=False`` beyond :func:`close`), is
    missing from ``fresh`` or is extra in it."""
    equal = same if exact else close
    lines = []
    for k in sorted(set(fresh) | set(stored)):
        if k not in fresh:
            lines.append(f'{k}: stored but not computed')
        elif k not in stored:
            lines.append(f'{k}: computed but not stored')
        elif not equal(fresh[k], stored[k]):
            lines.append(f'{k}: {describe_difference(fresh[k], stored[k])}')
    return lines


def versions() -> str:
    import PIL
    import matplotlib
    import timm
    return (f'torch {torch.__version__}, timm {timm.__version__}, numpy {np.__version__}, '
            f'PIL {PIL.__version__}, matplotlib {matplotlib.__version__}')


def load(path: Path = DEFAULT_OUT) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT, help='where to write the file (default: %(default)s)')
    ap.add_argument('--check', action='store_true', help='compare a fresh run with --out; write nothing')
    args = ap.parse_args(argv)
    if args.check:
        file = load(args.out)
        stored = {k: v for k, v in file.items() if not k.startswith('meta.')}
        exact = exact_here(file)
        if not exact:
            print(f'compared {comparison(file)}')
        diff = differences(compute_all(), stored, exact)
        for line in diff:
            print(line)
        print(f'{len(diff)} of {len(stored)} keys differ' if diff else f'all {len(stored)} keys identical')
        return 1 if diff else 0
    first, second = compute_all(), compute_all()
    diff = differences(first, second)
    if diff:
        print('two runs in one process differ; nothing written:', *diff, sep='\n  ')
        return 1
    first['meta.versions'] = np.array(versions())
    first['meta.cpu_capability'] = np.array(cpu_capability())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, 'wb') as f:
        np.savez_compressed(f, **first)
    print(f'wrote {args.out}: {len(first)} arrays, {args.out.stat().st_size / 1024:.1f} KiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
