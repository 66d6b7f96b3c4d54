"""Run directories: a model on disk is ``config.json`` + ``model.safetensors``.

``config.json`` follows timm's Hub layout (``architecture``, ``num_classes``, ``pretrained_cfg``,
``model_args``, ``label_names``), so once ``import deitlab`` has run,
``timm.create_model('local-dir:RUN_DIR', pretrained=True)`` rebuilds the model with its weights,
pruned per-block widths included. Nothing here unpickles arbitrary objects: weights are
safetensors, and ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import timm
from safetensors.torch import load_file, save_file

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'


class ModelLoadError(ValueError):
    """A model name, run directory or checkpoint that cannot be used, with the reason."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path so that a reader never sees a partial file (write, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_OS_ERROR = re.compile(r'\(os error (\d+)\)')


@contextlib.contextmanager
def _writer_errors_as_os_errors(path: Path) -> Iterator[None]:
    """Re-raise a file writer's I/O failure as the ``OSError`` it is. safetensors reports a full or
    size-limited disk as ``SafetensorError('... I/O error: File too large (os error 27)')`` and
    torch's zip writer (``inline_container.cc``) as a ``RuntimeError`` ('file write failed',
    'unexpected pos ...'); the CLI turns an OSError into one line naming the path."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:   # noqa: BLE001 -- only I/O failures are converted, anything else re-raised
        text = str(e)
        code = _OS_ERROR.search(text)
        if code:
            n = int(code.group(1))
            raise OSError(n, os.strerror(n), str(path)) from e
        if isinstance(e, RuntimeError) and ('write failed' in text or 'inline_container' in text):
            raise OSError(errno.EIO, 'writing failed, the file came out short (is the disk full or the file size '
                                     'limited?)', str(path)) from e
        raise


def _default_permissions(path: Path) -> None:
    """The mode a newly created file gets (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_resume_checkpoint(path: Path, resume: bool, error=ValueError, log=print):
    """The checkpoint at ``path`` to resume from, or None when ``resume`` is off or there is none
    (said through ``log`` when ``resume`` is on); ``error`` (one line) for a damaged file."""
    path = Path(path)
    if not (resume and path.exists()):
        if resume:
            log(f'no {path.name} in {path.parent}: starting a new run')
        return None
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # truncated or overwritten
        raise error(f'{path} is damaged ({type(e).__name__}: {str(e)[:120]}); the run cannot be resumed from it: '
                    f'train again into a new --out') from None


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with _writer_errors_as_os_errors(path):
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_args_of(model: nn.Module) -> dict:
    """Constructor arguments that rebuild ``model`` (per-block widths for deitlab models)."""
    args = getattr(model, 'model_args', None)
    if isinstance(args, dict):
        return dict(args)
    return {}


def architecture_of(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch:
        raise ModelLoadError('model has no pretrained_cfg["architecture"]; build it with timm.create_model')
    return arch


def _input_cfg(model: nn.Module) -> dict:
    """pretrained_cfg with input_size corrected to the model's real patch embed (size, channels)."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    for k in ('file', 'source', 'hf_hub_id', 'url', 'state_dict'):
        cfg.pop(k, None)
    if getattr(model, 'num_classes', None) is not None:
        cfg['num_classes'] = model.num_classes
    pe = getattr(model, 'patch_embed', None)
    if pe is not None and hasattr(pe, 'img_size') and hasattr(pe, 'proj'):
        chans = getattr(pe, 'in_chans', None) or pe.proj.in_channels   # a conv stem's proj reads its hidden width
        cfg['input_size'] = [chans, *pe.img_size]
        for key in ('mean', 'std'):
            if key in cfg and len(cfg[key]) != chans:
                cfg[key] = [cfg[key][0]] * chans
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _global_pool(model: nn.Module) -> Optional[str]:
    """The pooling name (CNNs such as timm's ResNet hold a pooling module, not a string)."""
    gp = getattr(model, 'global_pool', None)
    if gp is None or isinstance(gp, str):
        return gp
    return getattr(gp, 'pool_type', None) or None


def atomic_save_safetensors(state_dict: dict, path: Path) -> None:
    """Tensors (moved to the CPU, made contiguous) as a safetensors file, through a temporary file and
    a rename, with the permissions of any new file."""
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + '.tmp')
    try:
        with _writer_errors_as_os_errors(path):
            save_file(sd, str(tmp))
        _default_permissions(tmp)   # safetensors writes 0600; a run directory is shared like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_run_dir(model: nn.Module, out: str | Path, label_names: Optional[list] = None,
                 state_dict: Optional[dict] = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, 'module', model)
    atomic_save_safetensors(state_dict if state_dict is not None else unwrapped.state_dict(), out / WEIGHTS_NAME)
    config = {
        'architecture': architecture_of(unwrapped),
        'num_classes': getattr(unwrapped, 'num_classes', None),
        'num_features': getattr(unwrapped, 'num_features', None),
        'global_pool': _global_pool(unwrapped),
        'pretrained_cfg': _input_cfg(unwrapped),
        'model_args': model_args_of(unwrapped),
    }
    if label_names:
        config['label_names'] = list(label_names)
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(config, indent=2).encode())
    return out


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(f'not a run directory (no {CONFIG_NAME}): {run_dir}')
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f'{path} is not valid JSON: {e}') from None


def load_state_dict_file(path: str | Path) -> dict:
    """Tensors from a ``.safetensors`` file, or a ``.pth``/``.pt`` read with ``weights_only=True``.

    A ``.pth`` holding ``{'model': sd}``, ``{'state_dict': sd}`` or ``{'state_dict_ema': sd}`` is
    unwrapped, and DDP's ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f'checkpoint file does not exist: {path}')
    if path.suffix == '.safetensors':
        try:
            sd = load_file(str(path))
        except Exception as e:   # SafetensorError: truncated or not a safetensors file
            raise ModelLoadError(f'{path} is damaged (truncated or not a safetensors file: {e}); '
                                 f'save or copy it again') from None
    else:
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for junk
            raise ModelLoadError(f'cannot read {path} as a weights-only checkpoint: {e}') from None
        for key in ('model', 'state_dict', 'state_dict_ema'):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f'{path} does not hold a state dict of tensors')
    return {k[7:] if k.startswith('module.') else k: v for k, v in sd.items()}


def check_state_dict(model: nn.Module, sd: dict, source: str) -> None:
    """Raise a ModelLoadError that names the mismatch if ``sd`` does not fit ``model`` exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f'{source} does not match the architecture {getattr(model, "pretrained_cfg", {}).get("architecture")}: '
            f'{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})')
    head_keys = [k for k in ('head.weight', 'head_dist.weight') if k in own]
    for k in head_keys:
        if sd[k].shape != own[k].shape:
            raise ModelLoadError(
                f'{source} has {sd[k].shape[0]} classes but the model has {own[k].shape[0]} '
                f'({k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}); pass the matching num_classes '
                f'or reset the classifier after loading')
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ModelLoadError(f'{source}: {k} has shape {tuple(v.shape)} but the model expects '
                                 f'{tuple(own[k].shape)} (different widths: not the same architecture)')


def is_run_dir(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / CONFIG_NAME).is_file()


def create(name_or_dir: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a model from a timm/deitlab name or a run directory (weights loaded from the directory).

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``in_chans``, ``img_size``,
    ``drop_path_rate``, ...). For a run directory the saved architecture arguments are used and its
    weights are loaded strictly; asking for another ``num_classes`` gives a clear error.
    """
    from . import register_models
    register_models()   # deitlab's names resolve through timm's registry

    spec = str(name_or_dir)
    if spec.startswith('local-dir:'):
        spec = spec[len('local-dir:'):]
    if is_run_dir(spec):
        config = read_config(spec)
        weights = Path(spec) / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelLoadError(f'run directory {spec} has no {WEIGHTS_NAME}')
        arch = config.get('architecture')
        if not arch or not timm.is_model(arch):
            raise ModelLoadError(f'{spec}/config.json names an unknown architecture {arch!r}')
        args = dict(config.get('model_args') or {})
        saved_classes = config.get('num_classes')
        want = kwargs.pop('num_classes', None)
        if want is not None and saved_classes is not None and want != saved_classes:
            raise ModelLoadError(f'{spec} was saved with {saved_classes} classes, not {want}; load it as is '
                                 f'and call reset_classifier({want}) to fine-tune on new classes')
        saved_in = (config.get('pretrained_cfg') or {}).get('input_size')
        plain = not args and saved_in is not None  # a timm model: rebuild it at its saved input shape
        if plain:
            args.update(in_chans=int(saved_in[0]), img_size=tuple(int(v) for v in saved_in[1:]))
        args.update(kwargs)
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=saved_classes, **args)
        except TypeError as e:  # a CNN takes no img_size: its size lives in pretrained_cfg alone
            if not plain or 'img_size' in kwargs or 'img_size' not in str(e):
                raise
            args.pop('img_size')
            model = timm.create_model(arch, pretrained=False, num_classes=saved_classes, **args)
        sd = load_state_dict_file(weights)
        check_state_dict(model, sd, str(weights))
        model.load_state_dict(sd)
        cfg = dict(model.pretrained_cfg)
        cfg.update(config.get('pretrained_cfg') or {})
        cfg['architecture'] = arch
        model.pretrained_cfg = cfg
        if config.get('model_args') and not isinstance(getattr(model, 'model_args', None), dict):
            model.model_args = dict(config['model_args'])   # a timm model built with arguments: saved again with them
        if config.get('label_names'):
            model.pretrained_cfg['label_names'] = config['label_names']
        return model
    if spec.startswith('hf-hub:'):
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    if not spec.strip():
        raise ModelLoadError('the model is empty: give a deitlab/timm name or a run directory')
    if Path(spec).is_dir():
        raise ModelLoadError(f'{spec} is a directory but not a run directory (no {CONFIG_NAME})')
    if Path(spec).is_file():
        raise ModelLoadError(f'{spec} is a file, not a run directory or model name; to load weights from a file use '
                             f'timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))')
    if os.sep in spec:
        raise ModelLoadError(f'model path does not exist: {spec}')
    base = spec.split('.')[0]
    if not timm.is_model(base) and not timm.is_model(spec):
        close = timm.list_models(f'*{base.split("_")[0]}*')[:8] if base else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        raise ModelLoadError(f'unknown model name {spec!r} (not a timm/deitlab model nor a run directory){hint}. '
                             f'`deitlab models` lists deitlab architectures')
    try:
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as e:   # an argument of the wrong type or value (e.g. --model-kwargs)
        if not kwargs or 'img_size' in str(e):   # a CNN takes no img_size: callers give it another way
            raise
        shown = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
        raise ModelLoadError(f'cannot build {spec} with {shown}: {e}') from None
