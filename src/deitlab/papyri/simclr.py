"""SimCLR pretraining of a ResNet on unlabelled papyrus pages: ``deitlab papyri pretrain-simclr``.

Turnbull & Mannix (IJDAR 2024) pretrain a ResNet-50 with SimCLR on a large unlabelled corpus of
papyrus images (the Oxyrhynchus papyri), then fine-tune it on the labelled letter crops as one of the
two refiners that vote on every detected letter. SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple
Framework for Contrastive Learning of Visual Representations", ICML 2020) learns without labels:

1. each image ``x_k`` of a batch of ``N`` gives two augmented **views**, ``2N`` images in all;
2. an encoder ``f`` (here a timm ResNet, ``h = f(x)``, its pooled features) and a **projection head**
   ``g`` (Linear, BatchNorm, ReLU, Linear to ``proj_dim`` = 128) map each view to ``z = g(h)``;
3. the **NT-Xent** loss (normalised temperature-scaled cross entropy, the paper's eq. 1) makes the two
   views of an image (a positive pair ``i, j``) closer than every other view of the batch::

       sim(u, v) = u . v / (|u| |v|)
       l(i, j)   = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
       L         = 1 / (2N) * sum_{k=1..N} [ l(2k-1, 2k) + l(2k, 2k-1) ]

   (:func:`nt_xent`; ``tau`` = 0.2, Mannix's SimCLR setting);
4. after pretraining the head is **dropped** and ``f`` is kept: the run directory holds the backbone
   alone (``num_classes`` 0), which ``deitlab train --model RUN --data folder:CROPS`` fine-tunes into a
   letter classifier (its classifier is added there).

**The unlabelled data.** No annotation is read: the pages are cut into random square **windows** of
``window`` pixels (about one to two letters; a window may hold a letter, parts of two, or bare
papyrus), the analogue of the crops of unlabelled pages the paper's corpus gave
(:class:`PageWindows`). Window ``i`` of epoch ``e`` and both its views are drawn from ``(seed, e, i)``
alone, so ``resume`` continues to the weights of an unbroken run.

**The views, chosen for ink on papyrus** (:class:`GlyphViews`, in the order of SimCLR's and
lightly's ``SimCLRTransform``):

* a random resized crop keeping ``min_scale`` (0.5) to all of the window's area, not SimCLR's 0.08:
  a small part of a letter is often another letter (a piece of Η is an Ι), so aggressive crops teach
  the encoder to call different letters the same (Nakka's 2024 thesis found SimCLR on letter crops no
  better than supervised training for that reason);
* **no flips**, horizontal or vertical: a mirrored letter is another letter or none;
* a rotation of up to ``rotation`` (5) degrees, the slant of a hand;
* colour jitter of brightness, contrast and saturation (0.4 each, probability 0.8) and **no hue
  jitter**: hue jitter turns the beige papyrus and the brown ink into arbitrary colours of similar
  luminance, which at low contrast leaves faded ink nearly invisible against its background, and
  the encoder should learn the strokes, not the colour; brightness and contrast vary as scans and
  ink fading do;
* a grey view with probability 0.2 (luminance keeps the ink-papyrus contrast);
* a Gaussian blur with probability 0.5 of sigma 0.1 to 1 pixel at 32 px (scaled with ``img_size``):
  SimCLR's sigma of up to 2 px of a 224 px image would erase the strokes of a 32 px letter.

**lightly** (MIT, the optional ``simclr`` extra) provides ``NTXentLoss`` and ``SimCLRTransform``;
``backend='auto'`` uses them when installed, configured as above, and this module's own
implementation otherwise. The two compute the same loss (``tests/test_papyri_simclr.py`` checks them
against each other and against a hand computation).

**Training** runs on the shared :class:`~deitlab.train.loop.Trainer`: :class:`SimCLRStep` stacks the
two views into one batch (``on_batch``), projects them (``forward``) and takes NT-Xent (``loss``),
recording how often a view's nearest neighbour is its own partner (contrastive top-1);
:class:`SimCLREpochs` writes ``metrics.jsonl``, the backbone's run directory and ``checkpoint.pt``
(head and optimizer included) after every epoch; ``resume`` continues it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..console import log as _log
from ..data.glyphs import derive_seed
from ..distributed import resolve_device, seed_all
from ..rundir import (CONFIG_NAME, WEIGHTS_NAME, atomic_torch_save, atomic_write_bytes, load_resume_checkpoint,
                      save_run_dir)
from ..train.config import check_resume_settings
from ..train.loop import EpochRecords, Hooks, Trainer
from .config import PapyriError
from .refine_config import SimCLRConfig

__all__ = ['nt_xent', 'NTXent', 'resolve_backend', 'GlyphViews', 'make_views', 'PageWindows', 'SimCLRNet',
           'build_backbone', 'SimCLRStep', 'SimCLREpochs', 'pretrain_simclr', 'SIMCLR_CONFIG_NAME']

SIMCLR_CONFIG_NAME = 'simclr_config.json'
CHECKPOINT_NAME = 'checkpoint.pt'
METRICS_NAME = 'metrics.jsonl'
SUMMARY_NAME = 'summary.json'
_RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME, SIMCLR_CONFIG_NAME)
_RESUME_KEYS = ('images', 'model', 'model_kwargs', 'img_size', 'proj_dim', 'window', 'min_scale', 'rotation', 'jitter',
                'grayscale', 'blur', 'temperature', 'epochs', 'steps', 'warmup', 'batch_size', 'lr', 'opt',
                'weight_decay', 'seed')
_STREAM = 0x51C1   # names the windows' random stream (derive_seed)


# ------------------------------------------------------------------------------------------- loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (the module's docstring, SimCLR's eq. 1) of the projections ``z1[k]``, ``z2[k]`` of the
    two views of image ``k`` (each ``(N, D)``): the mean over the ``2N`` views of the cross entropy of
    finding the view's partner among the other ``2N - 1`` views, by cosine similarity over
    ``temperature``."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f'nt_xent needs two (N, D) projections with N >= 2, got {tuple(z1.shape)} and '
                         f'{tuple(z2.shape)}')
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float('-inf'))   # k != i
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def resolve_backend(backend: str) -> str:
    """``'lightly'`` or ``'native'``: ``auto`` is lightly when it is installed; asking for lightly
    without it is an error that says how to install it."""
    have = importlib.util.find_spec('lightly') is not None
    if backend == 'lightly' and not have:
        raise PapyriError("backend lightly needs the lightly package: pip install 'deitlab[simclr]' (or choose "
                          "backend native)")
    if backend not in ('auto', 'native', 'lightly'):
        raise PapyriError(f'backend must be auto, native or lightly, got {backend!r}')
    return 'lightly' if backend == 'lightly' or (backend == 'auto' and have) else 'native'


class NTXent(nn.Module):
    """NT-Xent as a module: lightly's ``NTXentLoss`` (backend ``lightly``) or :func:`nt_xent`."""

    def __init__(self, temperature: float = 0.2, backend: str = 'auto'):
        super().__init__()
        self.temperature, self.backend = float(temperature), resolve_backend(backend)
        self.lightly = None
        if self.backend == 'lightly':
            from lightly.loss import NTXentLoss
            self.lightly = NTXentLoss(temperature=self.temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if self.lightly is not None:
            return self.lightly(z1.float(), z2.float())
        return nt_xent(z1, z2, self.temperature)


# ------------------------------------------------------------------------------------------ views
class _Blur:
    """A Gaussian blur of PIL's with probability ``p``, sigma uniform in ``sigmas`` (numpy's random
    state, as lightly's ``GaussianBlur``)."""

    def __init__(self, p: float, sigmas: tuple):
        self.p, self.sigmas = p, sigmas

    def __call__(self, image: Image.Image) -> Image.Image:
        if np.random.random_sample() < self.p:
            return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*self.sigmas)))
        return image


class GlyphViews:
    """Two views of a PIL image (the module's docstring), normalised with ``mean`` / ``std``: a
    ``(2, 3, size, size)`` tensor. The same settings build lightly's ``SimCLRTransform`` (backend
    ``lightly``) or the torchvision transforms below (``native``)."""

    def __init__(self, size: int, mean, std, min_scale: float = 0.5, rotation: float = 5.0, jitter: float = 0.4,
                 grayscale: float = 0.2, blur: float = 0.5, backend: str = 'auto'):
        self.backend = resolve_backend(backend)
        sigmas = (0.1 * size / 32, 1.0 * size / 32)
        if self.backend == 'lightly':
            from lightly.transforms import SimCLRTransform
            self.transform = SimCLRTransform(
                input_size=size, cj_prob=0.8, cj_strength=1.0, cj_bright=jitter, cj_contrast=jitter, cj_sat=jitter,
                cj_hue=0.0, min_scale=min_scale, random_gray_scale=grayscale, gaussian_blur=blur, sigmas=sigmas,
                vf_prob=0.0, hf_prob=0.0, rr_prob=1.0 if rotation else 0.0, rr_degrees=rotation or None,
                normalize={'mean': list(mean), 'std': list(std)})
            self.view = None
            return
        from torchvision import transforms as T
        steps = [T.RandomResizedCrop(size, scale=(min_scale, 1.0))]
        if rotation:
            steps.append(T.RandomRotation(rotation))
        steps += [T.RandomApply([T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0)], p=0.8),
                  T.RandomGrayscale(p=grayscale), _Blur(blur, sigmas), T.ToTensor(), T.Normalize(mean, std)]
        self.view = T.Compose(steps)
        self.transform = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert('RGB')
        views = self.transform(image) if self.transform is not None else [self.view(image), self.view(image)]
        return torch.stack(list(views))


def make_views(cfg: SimCLRConfig, mean, std) -> GlyphViews:
    """The views of ``cfg``'s settings."""
    return GlyphViews(cfg.img_size, mean, std, cfg.min_scale, cfg.rotation, cfg.jitter, cfg.grayscale, cfg.blur,
                      cfg.backend)


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's and numpy's global random state set from ``seed`` for the block, then restored (the
    transforms draw from them)."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        try:
            yield
        finally:
            np.random.set_state(state)


class PageWindows(torch.utils.data.Dataset):
    """``length`` random windows of the pages per epoch, each as two views (the module's docstring):
    item ``i`` is ``(views (2, 3, S, S), 0)``, drawn from ``(seed, epoch, i)``; :meth:`set_epoch`
    before each epoch. Pages are chosen in proportion to their area and kept decoded."""

    def __init__(self, paths: Sequence, window: tuple, views, length: int, seed: int = 0):
        self.paths = [Path(p) for p in paths]
        self.window, self.views, self.length, self.seed = tuple(window), views, int(length), int(seed)
        sizes = []
        for p in self.paths:
            try:
                with Image.open(p) as im:
                    sizes.append(im.size)
            except OSError as e:
                raise PapyriError(f'{p} is not an image that can be read ({e})') from None
        if not sizes:
            raise PapyriError('no page images to cut windows from')
        area = np.array([w * h for w, h in sizes], dtype=np.float64)
        self.weights = area / area.sum()
        self.epoch = 0
        self._pages: dict = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _page(self, k: int) -> Image.Image:
        if k not in self._pages:
            with Image.open(self.paths[k]) as im:
                self._pages[k] = im.convert('RGB')
        return self._pages[k]

    def window_at(self, i: int) -> Image.Image:
        """Window ``i`` of the current epoch (before the views)."""
        rng = np.random.default_rng(derive_seed(self.seed, _STREAM, self.epoch, int(i)))
        page = self._page(int(rng.choice(len(self.weights), p=self.weights)))
        side = min(int(rng.integers(self.window[0], self.window[1] + 1)), *page.size)
        x0 = int(rng.integers(0, page.size[0] - side + 1))
        y0 = int(rng.integers(0, page.size[1] - side + 1))
        return page.crop((x0, y0, x0 + side, y0 + side))

    def __getitem__(self, i: int):
        window = self.window_at(i)
        with _seeded(derive_seed(self.seed, _STREAM + 1, self.epoch, int(i))):
            return self.views(window), 0


# ------------------------------------------------------------------------------------------ model
def build_backbone(name: str, img_size: int, model_kwargs: Optional[dict] = None) -> nn.Module:
    """A timm ResNet ``name`` from scratch (nothing is downloaded) without its classifier
    (``num_classes`` 0: ``model(x)`` is the pooled features), saved as taking ``img_size`` inputs."""
    import timm
    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        raise PapyriError(f'unknown model {name!r}: not a timm model (e.g. resnet18, resnet50)')
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise PapyriError(f'cannot build {name} with {kwargs}: {e}') from None
    cfg = dict(model.pretrained_cfg)
    cfg['input_size'] = (3, int(img_size), int(img_size))
    model.pretrained_cfg = cfg
    if kwargs:
        model.model_args = kwargs   # saved in config.json: the run directory rebuilds this shape
    return model


class SimCLRNet(nn.Module):
    """The encoder ``f`` and the projection head ``g`` (Linear, BatchNorm, ReLU, Linear to ``proj_dim``,
    as lightly's ``SimCLRProjectionHead``): ``forward(x) = g(f(x))``."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128):
        super().__init__()
        width = backbone.num_features
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                  nn.Linear(width, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ------------------------------------------------------------------------------------------ training
class SimCLRStep(Hooks):
    """One SimCLR update on the :class:`~deitlab.train.loop.Trainer`: the ``(B, 2, C, H, W)`` views
    become one batch of ``2B`` (first views, then second views), the model projects them, the loss is
    NT-Xent of the two halves; the epoch's contrastive top-1 (a view's most similar other view is its
    partner) goes into the row. Before an epoch: the windows of that epoch."""

    def __init__(self, loss_fn: nn.Module, windows: Optional[PageWindows] = None):
        self.loss_fn, self.windows = loss_fn, windows
        self.hits = self.seen = 0

    def before_epoch(self, epoch: int) -> None:
        self.hits = self.seen = 0
        if self.windows is not None:
            self.windows.set_epoch(epoch)

    def on_batch(self, x: torch.Tensor, y: torch.Tensor):
        if x.ndim != 5 or x.shape[1] != 2:
            raise PapyriError(f'a SimCLR batch holds two views per image, (B, 2, C, H, W); got {tuple(x.shape)}')
        return torch.cat([x[:, 0], x[:, 1]]), y

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x)

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = z.shape[0] // 2
        with torch.no_grad():
            u = F.normalize(z.detach().float(), dim=1)
            sim = u @ u.T
            sim.fill_diagonal_(float('-inf'))
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            self.hits += int((sim.argmax(1) == partner).sum())
            self.seen += 2 * n
        return self.loss_fn(z[:n], z[n:])

    def after_epoch(self, epoch: int, row: dict) -> None:
        row['contrastive_top1'] = 100.0 * self.hits / max(1, self.seen)


class SimCLREpochs(EpochRecords):
    """After each epoch: one row of ``metrics.jsonl``, the backbone's run directory (head dropped) and
    an atomic checkpoint of everything (head and optimizer included)."""

    def __init__(self, cfg: SimCLRConfig, out: Path, time_before: float = 0.0, cpu_before: float = 0.0):
        super().__init__(out / METRICS_NAME, time_before, cpu_before)
        self.cfg, self.out = cfg, out

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        _log(f'epoch {epoch + 1}: NT-Xent {row["train_loss"]:.4f}  contrastive top-1 {row["contrastive_top1"]:.1f}%')
        self.record(row)
        save_run_dir(t.model.backbone, self.out)
        atomic_torch_save(dict(t.state_dict(), epoch=epoch, config=self.cfg.to_dict(), train_time_s=self.train_time(),
                               train_cpu_s=self.train_cpu()), self.out / CHECKPOINT_NAME)


def _prepare_out(cfg: SimCLRConfig) -> Path:
    """``cfg.out``, checked like a detector's run directory: a file, a checkpoint without ``resume`` /
    ``overwrite`` or a directory of other files without ``overwrite`` is refused."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PapyriError(f'--out {out} is a file, not a directory')
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not cfg.resume and not cfg.overwrite:
        raise PapyriError(f'{out} already holds a SimCLR checkpoint; pass --resume to continue it, --overwrite to '
                          f'replace it, or choose another --out')
    own = set(_RUN_FILES) if (out / SIMCLR_CONFIG_NAME).is_file() else {METRICS_NAME}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if foreign and not cfg.overwrite:
        raise PapyriError(f'--out {out} is not empty ({", ".join(foreign[:4])}{", ..." if len(foreign) > 4 else ""}) '
                          f'and holds no SimCLR run; choose another --out, or pass --overwrite to replace what is there')
    if cfg.overwrite and not cfg.resume:
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resume(cfg: SimCLRConfig, trainer: Trainer, out: Path) -> tuple:
    """``(first epoch, checkpoint or None)``: after the checkpoint's epoch with ``resume`` (its rows of
    ``metrics.jsonl`` kept), else 0."""
    path, metrics = out / CHECKPOINT_NAME, out / METRICS_NAME
    ckpt = load_resume_checkpoint(path, cfg.resume, PapyriError, _log)
    if ckpt is None:
        metrics.unlink(missing_ok=True)
        return 0, None
    check_resume_settings(ckpt.get('config', {}), cfg, _RESUME_KEYS, path,
                          'resume with its settings, or train into a new --out')
    trainer.load_state_dict(ckpt)
    start = int(ckpt['epoch']) + 1
    if metrics.exists():
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get('epoch', 0) <= start]
        atomic_write_bytes(metrics, ''.join(ln + '\n' for ln in keep).encode())
    _log(f'resuming {out} after epoch {start}')
    return start, ckpt


def pretrain_simclr(cfg: SimCLRConfig, hooks: Sequence = ()) -> dict:
    """SimCLR pretraining of ``cfg.model`` on windows of the pages ``cfg.images`` into the run
    directory ``cfg.out`` (the module's docstring); returns the summary, also written to
    ``summary.json``. ``hooks``: more :class:`~deitlab.train.loop.Hooks` for the trainer."""
    from .predict import image_files
    cfg.validate()
    paths: List[Path] = image_files(cfg.images)
    backend = resolve_backend(cfg.backend)
    device = resolve_device(cfg.device)
    seed_all(cfg.seed)
    backbone = build_backbone(cfg.model, cfg.img_size, cfg.model_kwargs)
    mean, std = backbone.pretrained_cfg.get('mean', (0.5,) * 3), backbone.pretrained_cfg.get('std', (0.5,) * 3)
    windows = PageWindows(paths, cfg.window_px, make_views(cfg, mean, std), cfg.steps * cfg.batch_size, cfg.seed)
    out = _prepare_out(cfg)   # every input checked: nothing is written before
    model = SimCLRNet(backbone, cfg.proj_dim).to(device)
    loader = torch.utils.data.DataLoader(windows, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                                         num_workers=cfg.workers, pin_memory=device.type == 'cuda')
    total = cfg.epochs * cfg.steps

    def schedule(opt):
        from timm.scheduler import CosineLRScheduler
        return CosineLRScheduler(opt, t_initial=total, lr_min=cfg.lr * 1e-2, warmup_t=int(cfg.warmup * total),
                                 warmup_lr_init=cfg.lr * 1e-2, t_in_epochs=False)

    trainer = Trainer(model, dict(opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay), scheduler=schedule,
                      device=device, amp=cfg.amp, progress=cfg.progress, postfix_every=10)
    start, ckpt = _resume(cfg, trainer, out)
    epochs = SimCLREpochs(cfg, out, *((float(ckpt.get('train_time_s', 0.0)), float(ckpt.get('train_cpu_s', 0.0)))
                                      if ckpt else (0.0, 0.0)))
    del ckpt
    trainer.add_hooks(SimCLRStep(NTXent(cfg.temperature, backend), windows), epochs, *hooks)
    atomic_write_bytes(out / SIMCLR_CONFIG_NAME, json.dumps(dict(cfg.to_dict(), backend_resolved=backend,
                                                                 pages=len(paths)), indent=2).encode())
    params = sum(p.numel() for p in backbone.parameters())
    _log(f'SimCLR {cfg.model}: {params / 1e6:.2f}M params, {cfg.img_size} px views of {cfg.window} px windows of '
         f'{len(paths)} pages; {cfg.steps} updates of {cfg.batch_size} x 2 views per epoch; NT-Xent ({backend}), '
         f'tau {cfg.temperature}; on {device}')
    trainer.fit(loader, cfg.epochs, start, cfg.steps)
    last = epochs.last_row
    if not last and (out / METRICS_NAME).exists():   # a finished run resumed: nothing left to train
        rows = [json.loads(ln) for ln in (out / METRICS_NAME).read_text().splitlines() if ln.strip()]
        last = rows[-1] if rows else {}
    summary = dict(run_dir=str(out), model=cfg.model, backend=backend, pages=len(paths), epochs=cfg.epochs,
                   steps_per_epoch=cfg.steps, updates=total, batch_size=cfg.batch_size, params=params,
                   img_size=cfg.img_size, train_loss=last.get('train_loss'),
                   contrastive_top1=last.get('contrastive_top1'), train_time_s=epochs.train_time(),
                   train_cpu_s=epochs.train_cpu(), weights=str(out / WEIGHTS_NAME),
                   fine_tune=f'deitlab train --model {out} --data folder:CROPS --out RUN')
    atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    return summary
