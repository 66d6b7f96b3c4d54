"""NViT against Torch-Pruning and a uniform small DeiT on Fashion-MNIST, at three latency budgets.

Start model: the reference DeiT-nano (``benchmarks/reference/fmnist-deit-nano``, 89.12% test
top-1). Budgets are latency fractions of the dense model (0.7, 0.5, 0.35), predicted by one
latency table measured on this CPU (2 threads, batch 64) and shared by every arm. Every arm gets
the same number of training steps (``--total-steps``, batch 32) and the same soft distillation from
the dense model (alpha 0.5, T 2):

* ``nvit``       deitlab NViT: Hessian-aware saliency + latency penalty, pruned while training over
                 ``--prune-steps``, densified, fine-tuned for the remaining steps.
* ``tp_taylor``  Torch-Pruning 1.6.x ``BasePruner`` as its own DeiT example runs it
                 (examples/transformers/prune_timm_vit.py, DeiT-B Taylor script):
                 ``GroupTaylorImportance``, the same ratio in every layer, head dimensions pruned.
* ``tp_hessian`` ``GroupHessianImportance`` (per-sample gradients) ranked globally, whole heads and
                 head dimensions pruned (the strongest Torch-Pruning setting of the first run).
                 Both prune in ``--tp-steps`` (4) steps spread over NViT's ``--prune-steps``, each to
                 the next point of a linear latency schedule (the channel ratio of the step is
                 searched so that the predicted latency lands on it), with fresh importance scores
                 and the same distilled fine-tune between steps and after the last one.
* ``uniform``    a uniform-width DeiT with the GMACs of the NViT model, trained from scratch with
                 the same steps and distillation.

Every arm runs with ``--seeds`` (0 1 2); a seed sets the data order, NViT's and Torch-Pruning's
scoring batches and the uniform model's initialisation. Then, one fresh process per budget on a
quiet machine: test accuracy (10k), params, GMACs, and batch-1 latency and batch-64 throughput of
every seed's model measured interleaved against the dense model (``bench.compare``), with the
latency table's predicted speed-up; each row gives the mean and sample std over seeds.

    pip install --no-deps torch-pruning==1.6.1        # the peer; not a deitlab dependency
    python benchmarks/nvit_fmnist.py all --jobs 2      # 3 seeds, ~2 h on 2 cores (1 thread per job)
    python benchmarks/nvit_fmnist.py measure           # re-measure only (needs a quiet machine)
    python benchmarks/nvit_fmnist.py all --arms nvit nvit_lam0 nvit_taylor nvit_magnitude nvit_fisher \
        --budgets 0.5 --seeds 0 --result benchmarks/results/nvit_fmnist_ablation.json   # the ablation
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/nvit_fmnist.py lut           # the table again, timed like the measurements
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import FIXED_MALLOC, fresh_json

HERE = Path(__file__).resolve().parent
REF = HERE / 'reference' / 'fmnist-deit-nano'
RESULTS = HERE / 'results'
RUNS = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-nvit-bench'))
LUT = RESULTS / 'nvit_fmnist_latency_table.json'
LUT_FIXED = RESULTS / 'nvit_fmnist_latency_table_fixed_malloc.json'   # same, timed under FIXED_MALLOC
# glibc's malloc returns freed activation buffers to the OS and maps them again on the next call
# (page faults that cost large activations most and vary from call to call); fixed thresholds keep
# them in the heap, like the caching allocators used in deployment
DATA = 'fashion-mnist'
BUDGETS = (0.7, 0.5, 0.35)
ARMS = ('nvit', 'tp_taylor', 'tp_hessian', 'uniform')
# ablations of NViT (same loop): another saliency criterion, or no latency penalty
ABLATIONS = {'nvit_taylor': dict(criterion='taylor'), 'nvit_magnitude': dict(criterion='magnitude'),
             'nvit_fisher': dict(criterion='fisher'), 'nvit_lam0': dict(lam=0.0)}
COMMON = dict(batch_size=32, finetune_lr=2e-4, alpha=0.5, tau=2.0)


TARGET = {'kind': 'latency'}   # or 'gmacs' (--target): what a budget is a fraction of
OFB_ARMS = {'ofb': {}, 'ofb_nopmim': dict(pmim=False), 'ofb_paper': dict(grid='paper')}


def _run_name(arm: str, budget: float, seed: int) -> str:
    return f'{arm}_{budget}_s{seed}' if TARGET['kind'] == 'latency' else f'gmacs_{arm}_{budget}_s{seed}'


def _target(budget: float) -> dict:
    return {f"target_{TARGET['kind']}": budget}


def _finetune(model_dir: str, out: Path, steps: int, lr: float, warmup: float = 0.0, seed: int = 0) -> dict:
    from deitlab.train import TrainConfig, train
    per_epoch = 60000 // COMMON['batch_size']
    epochs = -(-steps // per_epoch)
    cfg = TrainConfig(model=model_dir, data=DATA, out=str(out), overwrite=True, epochs=epochs,
                      batch_size=COMMON['batch_size'], lr=lr,
                      warmup_epochs=warmup, min_lr=lr / 20, weight_decay=0.05, smoothing=0.0, mixup=0.0, cutmix=0.0,
                      drop_path=0.0, aug='none', teacher=str(REF), distill='soft', distill_alpha=COMMON['alpha'],
                      distill_tau=COMMON['tau'], kd_norm='batch', seed=seed, tensorboard=False, progress=False,
                      max_steps_per_epoch=-(-steps // epochs))
    return train(cfg)


# ------------------------------------------------------------------------------ arms

def run_nvit(budget: float, seed: int, args, arm: str = 'nvit') -> dict:
    from deitlab.prune import NViTConfig, prune_nvit
    out = RUNS / _run_name(arm, budget, seed)
    extra = dict(ABLATIONS.get(arm, {}))
    cfg = NViTConfig(model=str(REF), data=DATA, out=str(out), **_target(budget), lam=extra.pop('lam', args.lam),
                     interval=args.interval, prune_steps=args.prune_steps, total_steps=args.total_steps,
                     batch_size=COMMON['batch_size'], finetune_lr=COMMON['finetune_lr'],
                     finetune_alpha=COMMON['alpha'], finetune_tau=COMMON['tau'], lut=str(LUT), val_batches=10,
                     measure=False, progress=False, seed=seed, **extra)
    rep = prune_nvit(cfg)
    return dict(run_dir=str(out), prune_steps=rep['prune_steps'], estimate=rep['estimate'])


def _timm_vit(model):
    """Our DeiT (uniform or already pruned) as timm's VisionTransformer with the same tensors, which
    Torch-Pruning traces: per-block attention (heads x head width, query/key width = value width)
    and MLP widths, the model's own attention scale and explicit attention (SDPA would use the
    pruned head width's scale)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, VisionTransformer
    w = model.block_widths
    if list(w['qk_dim']) != list(w['v_dim']):
        raise ValueError('Torch-Pruning needs equal query/key and value head widths')
    e = model.embed_dim
    vit = VisionTransformer(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                            in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
                            embed_dim=e, depth=len(model.blocks), num_heads=1, mlp_ratio=1.0, qkv_bias=True)
    for blk, ours, h, d, m in zip(vit.blocks, model.blocks, w['num_heads'], w['qk_dim'], w['mlp_hidden']):
        blk.attn = Attention(e, num_heads=h, attn_head_dim=d, qkv_bias=True)
        blk.attn.scale = ours.attn.scale
        blk.attn.fused_attn = False
        blk.mlp = Mlp(e, hidden_features=m)
    vit.load_state_dict(model.state_dict())
    return vit


def _back_to_deitlab(vit, like, pruner):
    """The pruned timm ViT as a deitlab DeiT with its per-block widths and ``like``'s attention scale."""
    from deitlab.prune import build_like
    heads, dims, mlps = [], [], []
    for blk in vit.blocks:
        h = pruner.num_heads.get(blk.attn.qkv, blk.attn.num_heads)
        heads.append(int(h))
        dims.append(blk.attn.qkv.out_features // (3 * int(h)))
        mlps.append(blk.mlp.fc1.out_features)
    widths = dict(embed_dim=vit.patch_embed.proj.out_channels, num_heads=heads, qk_dim=dims, v_dim=dims,
                  mlp_hidden=mlps)
    model = build_like(like, widths)
    model.load_state_dict(vit.state_dict())
    model.pretrained_cfg = dict(like.pretrained_cfg)
    return model


# How each Torch-Pruning arm prunes. ``tp_taylor`` is Torch-Pruning's own DeiT example
# (examples/transformers/prune_timm_vit.py with its DeiT-B Taylor script): Taylor importance, the same
# ratio in every layer, head dimensions pruned and the number of heads kept. ``tp_hessian`` is the
# strongest setting of our first run: Hessian importance ranked globally, whole heads and head
# dimensions pruned.
TP_ARMS = {'taylor': dict(importance='taylor', global_pruning=False, prune_num_heads=False),
           'hessian': dict(importance='hessian', global_pruning=True, prune_num_heads=True)}


def tp_prune(model, kind: str, ratio: float, batches, head_ratio=None):
    """One Torch-Pruning step on ``model`` at a channel ratio (heads, when the arm prunes them, at
    ``head_ratio``, default the same). Returns None when a block would lose all its heads."""
    import torch.nn.functional as F
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    arm = TP_ARMS[kind]
    vit = _timm_vit(model).eval()
    example = batches[0][0][:2]
    imp = tp.importance.GroupTaylorImportance() if arm['importance'] == 'taylor' else \
        tp.importance.GroupHessianImportance()
    num_heads = {m.qkv: m.num_heads for m in vit.modules() if isinstance(m, Attention)}
    pruner = tp.pruner.BasePruner(vit, example, importance=imp, global_pruning=arm['global_pruning'],
                                  pruning_ratio=ratio, ignored_layers=[vit.head], num_heads=num_heads,
                                  prune_num_heads=arm['prune_num_heads'], prune_head_dims=True,
                                  head_pruning_ratio=(ratio if head_ratio is None else head_ratio)
                                  if arm['prune_num_heads'] else 0.0, round_to=1)
    vit.zero_grad()
    if arm['importance'] == 'taylor':
        for x, y in batches:
            F.cross_entropy(vit(x), y).backward()
    else:
        imp.zero_grad()
        for x, y in batches:
            for i in range(x.shape[0]):
                vit.zero_grad()
                F.cross_entropy(vit(x[i:i + 1]), y[i:i + 1]).backward()
                imp.accumulate_grad(vit)
    pruner.step()
    if any(pruner.num_heads[m.qkv] < 1 or m.qkv.out_features < 3 * pruner.num_heads[m.qkv]
           for m in vit.modules() if isinstance(m, Attention)):
        return None
    for m in vit.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, 'attn_dim'):
                m.attn_dim = m.num_heads * m.head_dim
    return _back_to_deitlab(vit, model, pruner)


def _tp_batches(kind: str, model, seed: int):
    """The images Torch-Pruning scores channels on (Taylor: 10 x 32; Hessian: 4 x 16 per-sample)."""
    import torch
    from deitlab.data import build_dataset
    from deitlab.train.engine import norm_stats
    mean, std = norm_stats(model, 1)
    ds = build_dataset(DATA, 'train', img_size=28, in_chans=1, aug='none', mean=mean, std=std)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_batches, bs = (10, 32) if TP_ARMS[kind]['importance'] == 'taylor' else (4, 16)
    batches = []
    for b in range(n_batches):
        items = [ds[int(i)] for i in idx[b * bs:(b + 1) * bs]]
        batches.append((torch.stack([t[0] for t in items]), torch.tensor([t[1] for t in items])))
    return batches


def _tp_to_fraction(model, kind: str, target: float, fraction_of, batches, search_steps: int):
    """Bisection on the channel ratio of one pruning step so that the pruned model's predicted
    latency (or GMACs, ``--target gmacs``), ``fraction_of(model)``, is at most ``target`` of the
    dense model's; (ratio, fraction, model)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        # a block left without heads is a broken model: retry with half the head ratio, else go lower
        pruned = tp_prune(model, kind, mid, batches) or tp_prune(model, kind, mid, batches, head_ratio=mid / 2)
        if pruned is None:
            hi = mid
            continue
        frac = fraction_of(pruned)
        if frac <= target:
            best, hi = (mid, frac, pruned), mid
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f'Torch-Pruning did not reach latency {target}')
    return best


def run_tp(kind: str, budget: float, seed: int, args) -> dict:
    """Torch-Pruning in ``--tp-steps`` steps spread over NViT's pruning phase: step k prunes the current
    model to latency ``1 - (1 - budget) k / K`` of the dense model with fresh importance scores, and
    fine-tunes it (same distillation) until the next step; the last step is followed by the rest of
    the ``--total-steps``, so the arm trains exactly as many steps as NViT."""
    from deitlab.bench import analytic_gmacs
    from deitlab.prune import LatencyTable
    from deitlab.rundir import create, save_run_dir
    dense = create(str(REF)).eval()
    lut = LatencyTable.load(LUT)
    base = lut.model_ms(dict(dense.block_widths, embed_dim=dense.embed_dim))
    if TARGET['kind'] == 'latency':
        def fraction_of(m):
            return lut.model_ms(dict(m.block_widths, embed_dim=m.embed_dim)) / base
    else:
        def fraction_of(m):
            return analytic_gmacs(m) / analytic_gmacs(dense)
    out = RUNS / _run_name(f'tp_{kind}', budget, seed)
    k_steps = max(1, args.tp_steps)
    seg = args.prune_steps // k_steps
    current, steps_done, events = dense, 0, []
    for k in range(1, k_steps + 1):
        target = 1 - (1 - budget) * k / k_steps
        ratio, frac, model = _tp_to_fraction(current, kind, target, fraction_of, _tp_batches(kind, current, seed + k),
                                             args.search_steps)
        last = k == k_steps
        steps = args.total_steps - steps_done if last else seg
        step_dir = out if last else out / f'step{k}'
        pruned_dir = save_run_dir(model, step_dir / 'pruned')
        _finetune(str(pruned_dir), step_dir, steps, COMMON['finetune_lr'], seed=seed)
        steps_done += steps
        events.append(dict(step=k, at_step=steps_done - steps, ratio=ratio, predicted_latency=frac))
        current = create(str(step_dir)).eval()
    return dict(run_dir=str(out), events=events, predicted_latency=events[-1]['predicted_latency'],
                steps=steps_done, widths=dict(current.block_widths, embed_dim=current.embed_dim))


def run_uniform(budget: float, seed: int, args) -> dict:
    """A uniform DeiT (depth 6, head width 32) whose GMACs match the NViT model of this budget and seed,
    trained from scratch (initialised from ``seed``)."""
    import timm
    import torch
    from deitlab.bench import analytic_gmacs
    from deitlab.rundir import create, save_run_dir
    nvit = create(str(RUNS / _run_name('nvit', budget, seed)))
    target = analytic_gmacs(nvit)
    best = None
    for heads in range(1, 4):
        for e in range(8, 97, 4):
            m = timm.create_model('deitlab_deit_nano_patch4_32', img_size=28, in_chans=1, num_classes=10, embed_dim=e,
                                  num_heads=heads, qk_dim=32, v_dim=32, mlp_hidden=4 * e)
            gap = abs(analytic_gmacs(m) - target)
            if best is None or gap < best[0]:
                best = (gap, m)
    torch.manual_seed(seed)
    model = timm.create_model('deitlab_deit_nano_patch4_32', img_size=28, in_chans=1, num_classes=10,
                              embed_dim=best[1].embed_dim, num_heads=best[1].block_widths['num_heads'][0], qk_dim=32,
                              v_dim=32, mlp_hidden=4 * best[1].embed_dim)
    model.pretrained_cfg = dict(create(str(REF)).pretrained_cfg)
    out = RUNS / _run_name('uniform', budget, seed)
    init_dir = save_run_dir(model, out / 'init')
    _finetune(str(init_dir), out, args.total_steps, args.scratch_lr, warmup=0.1, seed=seed)
    return dict(run_dir=str(out), gmacs_target=target, widths=dict(model.block_widths, embed_dim=model.embed_dim))


def run_ofb(budget: float, seed: int, args, arm: str = 'ofb') -> dict:
    """OFB with the same steps as NViT: the search over ``--prune-steps``, the fine-tune (same
    distillation) over the rest of ``--total-steps``."""
    from deitlab.prune.config import OFBConfig
    from deitlab.prune.ofb_search import prune_ofb
    out = RUNS / _run_name(arm, budget, seed)
    cfg = OFBConfig(model=str(REF), data=DATA, out=str(out), **_target(budget), lut=str(LUT),
                    search_steps=args.prune_steps, total_steps=args.total_steps, batch_size=COMMON['batch_size'],
                    finetune_lr=COMMON['finetune_lr'], finetune_alpha=COMMON['alpha'], finetune_tau=COMMON['tau'],
                    measure=False, progress=False, seed=seed, **OFB_ARMS[arm])
    rep = prune_ofb(cfg)
    return dict(run_dir=str(out), **{k: rep[k] for k in ('search_steps', 'search_time_s', 'search_forward_passes',
                                                         'forced_modules', 'shrinks', 'gmacs_fraction')})


def run_one(arm: str, budget: float, seed: int, args) -> dict:
    out = RUNS / _run_name(arm, budget, seed)
    if out.exists():   # an unfinished earlier attempt (run_all skips finished ones)
        shutil.rmtree(out)
    t0 = time.time()
    if arm == 'nvit' or arm in ABLATIONS:
        res = run_nvit(budget, seed, args, arm)
    elif arm.startswith('tp_'):
        res = run_tp(arm[3:], budget, seed, args)
    elif arm in OFB_ARMS:
        res = run_ofb(budget, seed, args, arm)
    else:
        res = run_uniform(budget, seed, args)
    res.update(arm=arm, budget=budget, seed=seed, train_wall_s=round(time.time() - t0, 1))
    (RUNS / _run_name(arm, budget, seed) / 'arm.json').write_text(json.dumps(res, indent=2, default=str))
    return res


# ------------------------------------------------------------------------------ phases

def build_lut(args, path=LUT) -> None:
    from deitlab.prune import build_latency_table
    from deitlab.rundir import create
    dense = create(str(REF)).eval()
    lut = build_latency_table(dense, batch_size=64, passes=args.lut_passes, threads=args.threads, progress=False)
    lut.meta['malloc'] = {k: os.environ.get(k) for k in FIXED_MALLOC}
    lut.save(path)
    print(f'latency table: {path} ({lut.meta["seconds"]} s)')


def run_all(args) -> None:
    """Train every arm and seed, ``--jobs`` processes at a time (1 thread each), seed by seed; a
    uniform arm waits for the NViT arm of its budget and seed."""
    RUNS.mkdir(parents=True, exist_ok=True)
    if not LUT.exists():
        build_lut(args)
    todo = [(a, b, sd) for sd in args.seeds for b in args.budgets for a in args.arms
            if not (RUNS / _run_name(a, b, sd) / 'arm.json').exists()]
    running: dict = {}
    env = dict(os.environ, OMP_NUM_THREADS='1')
    base = [sys.executable, __file__, '--target', TARGET['kind']]
    for k in ('total_steps', 'prune_steps', 'interval', 'lam', 'search_steps', 'scratch_lr', 'tp_steps'):
        base += [f'--{k.replace("_", "-")}', str(getattr(args, k))]
    while todo or running:
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                running.pop(key)
                print(f'{_run_name(*key)}: exit {proc.returncode}', flush=True)
        ready = [t for t in todo if t[0] != 'uniform' or (RUNS / _run_name('nvit', t[1], t[2]) / 'arm.json').exists()]
        while ready and len(running) < args.jobs:
            key = ready.pop(0)
            todo.remove(key)
            log = open(RUNS / f'{_run_name(*key)}.log', 'w')
            running[key] = subprocess.Popen(base + ['one', '--arm', key[0], '--budget', str(key[1]), '--seed',
                                                    str(key[2])], env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f'started {_run_name(*key)}', flush=True)
        if not ready and not running and todo:
            raise RuntimeError(f'cannot run {todo}: the NViT arms they need failed')
        time.sleep(5)
    measure(args)


def _accuracy(model) -> float:
    from deitlab.evaluate import evaluate_model
    return evaluate_model(model, DATA, split='val', batch_size=256)['top1']


SPEED_KEYS = ('throughput_ratio', 'latency_speedup')


def _mean_std(values) -> tuple:
    import numpy as np
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def measure(args) -> None:
    """Accuracy of every finished arm and seed, and its speed against the dense model (one fresh
    process per budget, every seed's model interleaved); a row per arm and budget with the mean and
    sample standard deviation over seeds, and each seed's values under ``seeds``."""
    import torch
    from deitlab.bench import analytic_gmacs, count_params
    from deitlab.prune import LatencyTable
    from deitlab.rundir import create
    torch.set_num_threads(args.threads)
    lut = LatencyTable.load(LUT)
    dense = create(str(REF)).eval()
    rows = [dict(arm='dense', budget=1.0, top1=_accuracy(str(REF)), params_m=count_params(dense) / 1e6,
                 gmacs=analytic_gmacs(dense), widths=dict(dense.block_widths, embed_dim=dense.embed_dim))]
    for b in args.budgets:
        runs = {}
        for arm in ARMS + tuple(ABLATIONS) + tuple(OFB_ARMS):
            for sd in args.seeds:
                if (RUNS / _run_name(arm, b, sd) / 'arm.json').exists():
                    runs.setdefault(arm, []).append(sd)
            if arm in ARMS and arm not in runs:
                print(f'skipping {arm} {b}: not trained')
        if not runs:
            continue
        speed = _speed_in_fresh_process(b, [f'{a}_s{sd}' for a, sds in runs.items() for sd in sds], args)
        for arm, sds in runs.items():
            per_seed = []
            for sd in sds:
                run = RUNS / _run_name(arm, b, sd)
                info = json.loads((run / 'arm.json').read_text())
                rep = json.loads((run / 'report.json').read_text()) if (run / 'report.json').exists() else {}
                info.update({k: rep[k] for k in COST_KEYS if k in rep})   # the search / pruning cost
                m = create(str(run)).eval()
                sp = speed[f'{arm}_s{sd}']
                per_seed.append(dict(seed=sd, top1=_accuracy(str(run)), params_m=count_params(m) / 1e6,
                                     gmacs=analytic_gmacs(m), widths=dict(m.block_widths, embed_dim=m.embed_dim),
                                     train_wall_s=info.get('train_wall_s'), predicted_speedup=sp['predicted_speedup'],
                                     predicted_speedup_fixed_malloc=sp.get('predicted_speedup_fixed_malloc'),
                                     latency_ms=sp['latency_ms'], images_per_s=sp['images_per_s'],
                                     detail=info, **{k: sp[k] for k in SPEED_KEYS},
                                     **{f'{k}_{e}': sp[f'{k}_{e}'] for k in SPEED_KEYS for e in ('lo', 'hi')}))
            row = dict(arm=arm, budget=b, n_seeds=len(per_seed), seeds=per_seed,
                       dense_images_per_s=speed['dense']['images_per_s'])
            for k in ('top1', 'params_m', 'gmacs', 'predicted_speedup', 'predicted_speedup_fixed_malloc') + SPEED_KEYS:
                vals = [r[k] for r in per_seed if r.get(k) is not None]
                if vals:
                    row[k], row[f'{k}_std'] = _mean_std(vals)
            row['widths'] = per_seed[0]['widths']
            rows.append(row)
    settings = dict(target=TARGET['kind'], threads=args.threads, batch=64, rounds=args.rounds, speed_env=FIXED_MALLOC,
                    data=DATA,
                    total_steps=args.total_steps, seeds=list(args.seeds), std='sample (ddof=1) over seeds',
                    prune_steps=args.prune_steps, interval=args.interval, lam=args.lam, tp_steps=args.tp_steps,
                    tp_arms=TP_ARMS, common=COMMON, torch=torch.__version__, lut_meta=lut.meta)
    try:
        import torch_pruning
        settings['torch_pruning'] = getattr(torch_pruning, '__version__', '?')
    except ImportError:
        pass
    out = dict(benchmark='nvit_fmnist', reference=str(REF.relative_to(HERE.parent)), settings=settings, rows=rows)
    result = Path(args.result)
    result.parent.mkdir(exist_ok=True)
    result.write_text(json.dumps(out, indent=2, default=str))
    if result == RESULTS / 'nvit_fmnist.json':
        plot(rows)
    for r in rows:
        print(f"{r['arm']:>10} {r['budget']:>5} top1 {r['top1']:6.2f} ± {r.get('top1_std', 0):.2f}  "
              f"GMACs {r['gmacs']:.4f}  params {r['params_m']:.3f}M  thr x{r.get('throughput_ratio', 1):.2f}  "
              f"lat x{r.get('latency_speedup', 1):.2f}  pred x{r.get('predicted_speedup', 1):.2f}")


COST_KEYS = ('prune_time_s', 'events', 'search_time_s', 'search_forward_passes', 'budget_reached', 'forced_modules')


def _speed_in_fresh_process(budget: float, names: list, args) -> dict:
    """Time the dense model and the runs ``names`` (``ARM_sSEED``) of one budget in a new process."""
    cmd = [sys.executable, __file__, 'speed', '--target', TARGET['kind'], '--budget', str(budget), '--runs', *names,
           '--rounds', str(args.rounds),
           '--threads', str(args.threads)]
    return fresh_json(cmd)


def speed(args) -> None:
    """Print one JSON object: ``bench.compare`` rows of the dense model and the runs of a budget."""
    import torch
    from deitlab.prune import LatencyTable
    from deitlab.prune.report import speed_rows
    from deitlab.rundir import create
    torch.set_num_threads(args.threads)
    models = {'dense': create(str(REF)).eval()}
    for name in args.runs:
        arm, sd = name.rsplit('_s', 1)
        models[name] = create(str(RUNS / _run_name(arm, args.budget, int(sd)))).eval()
    rows = speed_rows(models, 'dense', 64, LatencyTable.load(LUT), rounds=args.rounds)
    if LUT_FIXED.exists():   # the prediction of a table timed under the same allocator settings
        fixed = LatencyTable.load(LUT_FIXED)
        base = fixed.model_ms(dict(models['dense'].block_widths, embed_dim=models['dense'].embed_dim))
        for r in rows:
            m = models[r['name']]
            r['predicted_speedup_fixed_malloc'] = base / fixed.model_ms(dict(m.block_widths, embed_dim=m.embed_dim))
    print(json.dumps({r['name']: r for r in rows}, default=str))


def _predicted(row) -> float:
    return row.get('predicted_speedup_fixed_malloc') or row.get('predicted_speedup', 1.0)


def plot(rows) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from deitlab.prune.report import plot_widths
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = next(r for r in rows if r['arm'] == 'dense')
    marks = dict(nvit='o-', tp_taylor='s--', tp_hessian='^--', uniform='d:')
    for arm, style in marks.items():
        rs = sorted((r for r in rows if r['arm'] == arm and 'throughput_ratio' in r), key=lambda r: r['budget'])
        if not rs:
            continue
        axes[0].plot([r['throughput_ratio'] for r in rs], [r['top1'] for r in rs], style, label=arm)
        axes[1].plot([r['gmacs'] for r in rs], [r['top1'] for r in rs], style, label=arm)
        axes[2].plot([_predicted(r) for r in rs], [r['throughput_ratio'] for r in rs], style, label=arm)
    for arm, marker in zip(ABLATIONS, 'xPv*'):
        rs = [r for r in rows if r['arm'] == arm and 'throughput_ratio' in r]
        if rs:
            axes[0].plot([r['throughput_ratio'] for r in rs], [r['top1'] for r in rs], marker, color='0.35', label=arm)
            axes[1].plot([r['gmacs'] for r in rs], [r['top1'] for r in rs], marker, color='0.35', label=arm)
    ofb = RESULTS / 'ofb_fmnist.json'   # OFB's runs (GMACs budgets, benchmarks/ofb_fmnist.py) on the same axes
    rs = sorted((r for r in json.loads(ofb.read_text())['rows'] if r['arm'] == 'ofb') if ofb.exists() else [],
                key=lambda r: r['budget'])
    if rs:
        axes[0].plot([r['throughput_ratio'] for r in rs], [r['top1'] for r in rs], 'o-', color='tab:purple',
                     label='ofb (GMACs budget)')
        axes[1].plot([r['gmacs'] for r in rs], [r['top1'] for r in rs], 'o-', color='tab:purple', label='ofb (GMACs budget)')
    axes[0].axhline(dense['top1'], color='0.6', lw=1, label='dense')
    axes[1].axhline(dense['top1'], color='0.6', lw=1)
    axes[0].set_xlabel('measured throughput speed-up (batch 64, CPU)')
    axes[1].set_xlabel('GMACs')
    for ax in axes[:2]:
        ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    lim = [1, max([_predicted(r) for r in rows] + [r.get('throughput_ratio', 1) for r in rows]) * 1.05]
    axes[2].plot(lim, lim, color='0.6', lw=1)
    axes[2].set_xlabel('predicted speed-up (table timed like the measurements)')
    axes[2].set_ylabel('measured throughput speed-up')
    for ax in axes:
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    fig.suptitle('Pruning DeiT-nano on Fashion-MNIST: same steps and distillation for every arm')
    fig.tight_layout()
    fig.savefig(RESULTS / 'nvit_fmnist.png', dpi=110)
    plt.close(fig)
    for r in rows:
        if r['arm'] == 'nvit':
            plot_widths(dense['widths'], r['widths'], RESULTS / f'nvit_fmnist_widths_{r["budget"]}.png',
                        title=f'NViT, latency budget {r["budget"]}')


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('phase', choices=['lut', 'all', 'one', 'measure', 'speed', 'plot'])
    p.add_argument('--arm', choices=ARMS + tuple(ABLATIONS) + tuple(OFB_ARMS))
    p.add_argument('--target', choices=['latency', 'gmacs'], default='latency',
                   help='what a budget is a fraction of (gmacs: the OFB benchmark, benchmarks/ofb_fmnist.py)')
    p.add_argument('--budget', type=float)
    p.add_argument('--arms', nargs='*', default=list(ARMS))
    p.add_argument('--budgets', nargs='*', type=float, default=list(BUDGETS))
    p.add_argument('--seed', type=int, default=0, help='the seed of a single run (phase one)')
    p.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2])
    p.add_argument('--runs', nargs='*', default=[], help='phase speed: ARM_sSEED names to time')
    p.add_argument('--tp-steps', type=int, default=4, help='Torch-Pruning steps over --prune-steps')
    p.add_argument('--jobs', type=int, default=2)
    p.add_argument('--threads', type=int, default=2, help='threads for the latency table and the measurements')
    p.add_argument('--total-steps', type=int, default=1875, help='training steps per arm (1875 = one epoch)')
    p.add_argument('--prune-steps', type=int, default=800)
    p.add_argument('--interval', type=int, default=20)
    p.add_argument('--lam', type=float, default=0.02)
    p.add_argument('--search-steps', type=int, default=8)
    p.add_argument('--scratch-lr', type=float, default=1e-3)
    p.add_argument('--lut-passes', type=int, default=3)
    p.add_argument('--rounds', type=int, default=15, help='interleaved timing rounds per budget')
    p.add_argument('--result', default=str(RESULTS / 'nvit_fmnist.json'),
                   help='where measure writes its JSON (the ablation: results/nvit_fmnist_ablation.json)')
    args = p.parse_args(argv)
    TARGET['kind'] = args.target
    if args.phase == 'lut':
        build_lut(args, LUT_FIXED if all(os.environ.get(k) == v for k, v in FIXED_MALLOC.items()) else LUT)
    elif args.phase == 'one':
        print(json.dumps(run_one(args.arm, args.budget, args.seed, args), default=str))
    elif args.phase == 'all':
        run_all(args)
    elif args.phase == 'speed':
        speed(args)
    elif args.phase == 'plot':   # redraw from the saved results
        plot(json.loads((RESULTS / 'nvit_fmnist.json').read_text())['rows'])
    else:
        measure(args)


if __name__ == '__main__':
    main()
