"""Regenerate ``tests/data/token_parity_deit_tiny.npz``: the outputs of the authors' ToMe and MCTF
code that ``tests/test_tokens_parity.py`` compares deitlab's token fusion with.

The authors' code is not a dependency of deitlab and is never downloaded here; check it out
yourself at the commits the golden file was made with and give the paths::

    git clone https://github.com/facebookresearch/ToMe /tmp/ToMe
    git -C /tmp/ToMe checkout af95e4b1befa172dadccd8c81e223b10090f9579
    git clone https://github.com/mlvlab/MCTF /tmp/MCTF
    git -C /tmp/MCTF checkout 2004da0cad3231fa74cbd60b6042b0bd133aacde

    # compare a fresh run with the committed file (writes nothing)
    python tests/data/make_golden.py --tome-path /tmp/ToMe --mctf-path /tmp/MCTF --check
    # write the file (after changing SETTINGS in tests/test_tokens_parity.py, say)
    python tests/data/make_golden.py --tome-path /tmp/ToMe --mctf-path /tmp/MCTF --out tests/data/token_parity_deit_tiny.npz

ToMe imports ``tqdm`` and ``PIL``; MCTF's ViT imports unchanged under timm 1.0.31 through timm's
deprecated module paths (``timm.models.layers`` and friends, with deprecation warnings). The
committed file was made with timm 1.0.31 and torch 2.14.1 on CPU, in float64; there, ``--check``
finds every array identical, and ``--out`` writes a byte-identical file.

What runs (``tests/test_tokens_parity.py`` says the same from the test's side):

* The settings, the weights and the two images are the test module's own ``SETTINGS`` and
  ``deterministic_deit`` (imported from it, so the two cannot drift apart), cast to float64.
* ToMe: a deep copy of the timm model, patched with ``tome.patch.timm(model, trace_source=True,
  prop_attn=...)``, ``model.r`` set to the setting's ``r`` (an int or an (r, inflection) pair),
  one forward. Sizes and sources are read from ``model._tome_info``; where no merge ran (r = 0)
  the patch leaves them ``None``, which means every token has size 1 and is its own group.
* MCTF: the authors' ``deit_tiny`` (their ``models/deit.py``) built as their evaluation scripts
  build it (``run/eval_deit_t_mctf*.sh``): ``use_mctf=True``, ``task_type=[1, 0, 0, 0]``,
  ``activate_layer`` 1..11 (MCTF-Fast: 3, 6, 9) and ``mctf_type = [r, 0, trace_source=1,
  prop_attn, one_step_ahead, tau_sim, tau_info, tau_size, bidirection, pooling, 0]`` with the
  released defaults (prop_attn 1, one-step-ahead 1, tau 1 / 20 / 40, bidirectional, pooling 1)
  unless the setting overrides them; loaded strictly with the timm model's state dict (the
  parameter names are the same), eval mode, ``model(images, r_eval=r)`` as their ``evaluate``
  calls it. Sizes and sources are ``model.info['student_size']`` / ``['student_source']``.

Stored per setting: ``<name>.logits`` (2 x 1000, float32), ``<name>.size`` (final token sizes,
int16) and ``<name>.groups`` (for each input token, the index of the final token holding it,
int16); and ``meta.tome_commit``, ``meta.mctf_commit``, ``meta.versions``.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]
DEFAULT_OUT = TESTS / 'data' / 'token_parity_deit_tiny.npz'
TOME_COMMIT = 'af95e4b1befa172dadccd8c81e223b10090f9579'
MCTF_COMMIT = '2004da0cad3231fa74cbd60b6042b0bd133aacde'

# The released MCTF defaults (run/eval_deit_t_mctf.sh), under deitlab's option names.
MCTF_DEFAULTS = dict(prop_attn=True, mode='one_step_ahead', tau_sim=1, tau_info=20, tau_size=40,
                     bidirectional=True, pooling='attn_size')
MCTF_FAST = dict(r=0.35, layers=[3, 6, 9])


def _commit(path: Path) -> str:
    return subprocess.run(['git', '-C', str(path), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()


def _outputs(size, source, logits, tokens: int, batch: int):
    """(logits fp32, sizes int16 (B, T), groups int16 (B, T0)); ``None`` size / source: no merge ran."""
    from test_tokens_parity import groups_of
    if size is None:
        size = torch.ones(batch, tokens, 1)
    if source is None:
        source = torch.eye(tokens).expand(batch, tokens, tokens)
    return (logits.float().numpy(), size[..., 0].to(torch.int16).numpy(),
            groups_of(source).to(torch.int16).numpy())


def run_tome(tome, model, images, options: dict):
    options = dict(options)
    r = options.pop('r')
    prop_attn = options.pop('prop_attn', True)
    if options:
        raise ValueError(f'no ToMe reference for options {sorted(options)}')
    model = copy.deepcopy(model)
    tome.patch.timm(model, trace_source=True, prop_attn=prop_attn)
    model.r = r
    with torch.no_grad():
        logits = model(images)
    info = model._tome_info
    return _outputs(info['size'], info['source'], logits, model.patch_embed.num_patches + model.num_prefix_tokens,
                    images.shape[0])


def mctf_type_of(options: dict):
    """(r, activate_layer, mctf_type) of the authors' code for deitlab's apply_mctf options."""
    from test_tokens_parity import MCTF_MODE, MCTF_POOLING
    options = dict(options)
    if options.pop('fast', False):
        r, layers = MCTF_FAST['r'], MCTF_FAST['layers']
    else:
        r, layers = options.pop('r'), list(range(1, 12))
    o = {**MCTF_DEFAULTS, **options}
    unknown = set(o) - set(MCTF_DEFAULTS)
    if unknown:
        raise ValueError(f'no MCTF reference for options {sorted(unknown)}')
    mode = {v: k for k, v in MCTF_MODE.items()}[o['mode']]
    pooling = {v: k for k, v in MCTF_POOLING.items()}[o['pooling']]
    return r, layers, [r, 0, 1, int(o['prop_attn']), mode, o['tau_sim'], o['tau_info'], o['tau_size'],
                       int(o['bidirectional']), pooling, 0]


def run_mctf(mctf_deit, model, images, options: dict):
    r, layers, mctf_type = mctf_type_of(options)
    ref = mctf_deit.deit_tiny(num_classes=1000, use_mctf=True, mctf_type=mctf_type, task_type=[1, 0, 0, 0],
                              activate_layer=layers)
    ref.load_state_dict(model.state_dict(), strict=True)
    ref = ref.to(images.dtype).eval()
    with torch.no_grad():
        logits = ref(images, r_eval=r)
    return _outputs(ref.info['student_size'], ref.info['student_source'], logits,
                    ref.patch_embed.num_patches + ref.num_tokens, images.shape[0])


def generate(tome_path: Path, mctf_path: Path, allow_other_commits: bool = False) -> dict:
    commits = {'tome': _commit(tome_path), 'mctf': _commit(mctf_path)}
    for name, want in (('tome', TOME_COMMIT), ('mctf', MCTF_COMMIT)):
        if commits[name] != want and not allow_other_commits:
            raise SystemExit(f'{name} checkout is at {commits[name]}, the golden file was made at {want} '
                             '(--allow-other-commits to go on anyway)')
    # MCTF's modules are top-level `models` and `utils`: nothing else may have claimed those names
    for clash in ('models', 'utils'):
        if clash in sys.modules:
            raise SystemExit(f"a module named '{clash}' is already imported; MCTF needs the name")
    sys.path[:0] = [str(TESTS), str(tome_path), str(mctf_path)]
    import timm
    import tome
    import models.deit as mctf_deit
    from test_tokens_parity import SETTINGS, deterministic_deit

    torch.set_num_threads(1)
    bases = {}
    out = {}
    for name, (model_name, method, options) in SETTINGS.items():
        if model_name not in bases:
            bases[model_name] = deterministic_deit(model_name, dtype=torch.float64)
        model, images = bases[model_name]
        if method == 'tome':
            logits, size, groups = run_tome(tome, model, images, options)
        else:
            logits, size, groups = run_mctf(mctf_deit, model, images, options)
        out[f'{name}.logits'], out[f'{name}.size'], out[f'{name}.groups'] = logits, size, groups
        print(f'{name:32s} tokens out {size.shape[1]:4d}', flush=True)
    out['meta.tome_commit'] = np.array(commits['tome'])
    out['meta.mctf_commit'] = np.array(commits['mctf'])
    out['meta.versions'] = np.array(f'timm {timm.__version__}, torch {torch.__version__}, computed in float64')
    return out


def compare(new: dict, path: Path) -> bool:
    """True when every data array of ``new`` equals the stored one exactly (meta is reported only)."""
    with np.load(path) as z:
        old = {k: z[k] for k in z.files}
    same = set(new) == set(old)
    if not same:
        print(f'keys differ: only new {sorted(set(new) - set(old))}, only stored {sorted(set(old) - set(new))}')
    for key in sorted(set(new) & set(old)):
        a, b = new[key], old[key]
        if key.startswith('meta.'):
            if a != b:
                print(f'{key}: stored {b}, now {a}')
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            print(f'{key}: stored {b.dtype}{b.shape}, now {a.dtype}{a.shape}')
            same = False
        elif not np.array_equal(a, b):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max()
            print(f'{key}: differs (max abs difference {diff:.3g})')
            same = False
    print('identical to the stored file' if same else 'DIFFERENT from the stored file')
    return same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tome-path', type=Path, required=True, help=f'checkout of facebookresearch/ToMe at {TOME_COMMIT}')
    p.add_argument('--mctf-path', type=Path, required=True, help=f'checkout of mlvlab/MCTF at {MCTF_COMMIT}')
    p.add_argument('--out', type=Path, default=None, help='write the golden file here')
    p.add_argument('--check', action='store_true', help=f'compare with {DEFAULT_OUT.name} and write nothing')
    p.add_argument('--allow-other-commits', action='store_true')
    args = p.parse_args(argv)
    if args.check == (args.out is not None):
        p.error('give exactly one of --check and --out')
    new = generate(args.tome_path.resolve(), args.mctf_path.resolve(), args.allow_other_commits)
    if args.check:
        return 0 if compare(new, DEFAULT_OUT) else 1
    np.savez_compressed(args.out, **new)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
