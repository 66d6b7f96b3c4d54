"""Glyph detectors behind one interface, and their training: ``deitlab papyri train-detector``.

Turnbull & Mannix (IJDAR 2024) find the letters of the ICDAR 2023 papyri competition with YOLOv8
detectors whose boxes are fused, then re-classified. Here a detector is anything that turns a page
into :class:`~deitlab.papyri.fusion.Detections` (pixel xyxy boxes, scores, labels 0..23 in the
order of :data:`~deitlab.papyri.alphabet.LETTERS`):

* :class:`Detector`: ``predict(image)`` for one page (a float tensor ``(C, H, W)`` in [0, 1], a PIL
  image or an image file), tile by tile through :func:`~deitlab.papyri.tiling.tile_predict` with
  the run's tile size and overlap, so a page of any size is seen at the scale the detector was
  trained at; ``predict_many(images)``; ``name`` (the detector's registry name) and ``run_dir``.
  :class:`TorchvisionDetector` holds a torchvision model (:mod:`.detectors`); the YOLOv8 adapter
  (:mod:`.yolo`, the optional AGPL extra) is another subclass.
* :func:`load_detector` rebuilds one from a run directory (and refuses, with the reason, any
  directory that is not one, such as a classification run of ``deitlab train``).
* :func:`train_detector` trains one (the registry :data:`~deitlab.registry.DETECTORS` names them;
  the default ``fcos-r18`` is permissive) and writes the run directory.

**Training** (the torchvision detectors; one process): random crops of the tile size
(:class:`~deitlab.papyri.detect_data.PageCrops`: no flips, mild photometric jitter), ``steps``
updates per epoch on the shared :class:`~deitlab.train.loop.Trainer` with two hooks:
:class:`DetectionLoss` (torchvision's training forward returns the loss parts; the loss is their
sum, each part's epoch mean goes into the metrics) and :class:`DetectorEpochs` (before an epoch:
the crops of that epoch; after it: the detection and recognition mAP@.5 and mAP@[.5:.95] of the
``val`` pages by the organisers' metric (:func:`~deitlab.papyri.metric.evaluate`), one row of
``metrics.jsonl``, the weights and an atomic checkpoint). The optimizer is AdamW by default with a
linear warm-up and a per-update cosine (timm), gradient clipping, bf16 autocast on CUDA. Crops
depend on ``(seed, epoch, index)`` only, so ``resume`` continues from the last epoch's checkpoint
to the weights an unbroken run reaches.

**The run directory**: ``config.json`` (``kind: papyri-detector``, the detector's name and
constructor arguments, the classes, tile and overlap, the input normalisation, the data trained on
with its annotation file's SHA-256, the training settings), ``model.safetensors``,
``metrics.jsonl`` (per epoch), ``summary.json`` and ``checkpoint.pt``; every file is written
atomically.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..console import log as _log
from ..distributed import resolve_device, seed_all
from ..registry import DETECTORS
from ..rundir import (CONFIG_NAME, WEIGHTS_NAME, atomic_save_safetensors, atomic_torch_save, atomic_write_bytes,
                      load_resume_checkpoint)
from ..train.config import check_resume_settings
from ..train.loop import EpochRecords, Hooks, Trainer
from .alphabet import CATEGORY_IDS, LETTERS, NAMES
from .config import DetectorConfig, PapyriError
from .detect_data import PageCrops, Pages, collate_crops, load_page, page_tensor, read_pages, unpack_targets
from .fusion import Detections
from .tiling import tile_predict

__all__ = ['KIND', 'Detector', 'TorchvisionDetector', 'build_detector_model', 'load_detector', 'read_run_config',
           'to_coco_results', 'evaluate_detector', 'DetectionLoss', 'DetectorEpochs', 'train_detector',
           'CHECKPOINT_NAME', 'METRICS_NAME', 'SUMMARY_NAME']

#: ``config.json``'s ``kind`` in a detector run directory.
KIND = 'papyri-detector'
CHECKPOINT_NAME = 'checkpoint.pt'
METRICS_NAME = 'metrics.jsonl'
SUMMARY_NAME = 'summary.json'
_RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME)
# settings a resumed run must share with the run it continues (what shapes the data, model and updates)
_RESUME_KEYS = ('data', 'detector', 'tile', 'min_visible', 'jitter', 'min_size', 'max_size', 'epochs', 'steps',
                'warmup', 'batch_size', 'lr', 'opt', 'weight_decay', 'grad_clip', 'seed')


# ------------------------------------------------------------------------------------------ detectors
class Detector(ABC):
    """A glyph detector for whole pages (the module's docstring). Subclasses implement
    :meth:`predict_tile`; :meth:`predict` runs it over the page's tiles.

    Attributes: ``name`` (the detector's registry name, e.g. ``fcos-r18``), ``tile`` and ``overlap``
    (pixels), ``run_dir`` (the run directory it was loaded from, or None) and ``config`` (that
    directory's ``config.json``, or what a run in progress will write)."""

    def __init__(self, name: str, tile: int, overlap: int, run_dir=None, config: Optional[dict] = None):
        self.name, self.tile, self.overlap = name, int(tile), int(overlap)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = dict(config or {})

    @abstractmethod
    def predict_tile(self, image: torch.Tensor) -> Detections:
        """The detections on one tile ``(3, h, w)`` (h, w at most the tile size), in tile pixels; each
        kind of detector (torchvision, YOLO) gives its own."""

    def predict(self, image) -> Detections:
        """The detections on one page (a float tensor ``(C, H, W)`` in [0, 1], a PIL image, a numpy
        array or an image file), in page pixels: tile by tile, cut boxes dropped, the rest merged
        (:func:`~deitlab.papyri.tiling.tile_predict`)."""
        return tile_predict(page_tensor(image), self.predict_tile, self.tile, self.overlap)

    def predict_many(self, images: Iterable) -> List[Detections]:
        """:meth:`predict` of each page, in order."""
        return [self.predict(image) for image in images]

    def __repr__(self) -> str:
        where = f', run_dir={str(self.run_dir)!r}' if self.run_dir else ''
        return f'{type(self).__name__}({self.name!r}, tile={self.tile}, overlap={self.overlap}{where})'


class TorchvisionDetector(Detector):
    """A torchvision detection model (:mod:`.detectors`) as a :class:`Detector`. Predictions run in
    eval mode, without gradients, in float32 (boxes of bf16 would be off by pixels on large tiles),
    on ``device`` (default: where the model is); the model's mode is restored afterwards."""

    def __init__(self, name: str, model: nn.Module, tile: int, overlap: int, device=None, run_dir=None,
                 config: Optional[dict] = None):
        super().__init__(name, tile, overlap, run_dir, config)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def predict_tile(self, image: torch.Tensor) -> Detections:
        self.model.eval()
        with torch.inference_mode():
            out = self.model([image.to(self.device, torch.float32)])[0]
        return Detections(out['boxes'], out['scores'], out['labels'])

    def predict(self, image) -> Detections:
        was_training = self.model.training
        try:
            return tile_predict(page_tensor(image).to(self.device), self.predict_tile, self.tile, self.overlap)
        finally:
            self.model.train(was_training)


def build_detector_model(name: str, args: Optional[dict] = None) -> nn.Module:
    """The torchvision model of the registered detector ``name``, built from its keyword arguments
    (untrained; nothing is downloaded)."""
    entry = DETECTORS.get(name, PapyriError, 'detector')
    if entry['backend'] != 'torchvision':
        raise PapyriError(f'detector {name!r} is not a torchvision model (backend {entry["backend"]})')
    try:
        return entry.load()(**dict(args or {}))
    except TypeError as e:   # a saved argument this version does not know
        raise PapyriError(f'cannot build detector {name!r} with {args}: {e}') from None


def read_run_config(run_dir) -> dict:
    """``config.json`` of a detector run directory; :class:`PapyriError` saying why ``run_dir`` is
    not one (missing, a file, no or unreadable ``config.json``, a run of another kind)."""
    run_dir = Path(run_dir)
    hint = 'train one with deitlab papyri train-detector'
    if not run_dir.exists():
        raise PapyriError(f'detector run directory does not exist: {run_dir}')
    if not run_dir.is_dir():
        raise PapyriError(f'{run_dir} is a file, not a detector run directory')
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise PapyriError(f'{run_dir} is not a detector run directory (no {CONFIG_NAME}): {hint}')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PapyriError(f'{path} is not JSON ({e}): not a detector run directory') from None
    if not isinstance(config, dict):
        raise PapyriError(f'{path} holds no JSON object: not a detector run directory')
    if config.get('kind') != KIND:
        if 'architecture' in config:
            raise PapyriError(f'{run_dir} is a classification run directory (its {CONFIG_NAME} names the '
                              f'architecture {config["architecture"]!r}, as deitlab train writes), not a detector run '
                              f'directory: {hint}')
        raise PapyriError(f'{run_dir} is not a detector run directory ({CONFIG_NAME} has kind '
                          f'{config.get("kind")!r}, not {KIND!r}): {hint}')
    return config


def load_detector(run_dir, device=None) -> Detector:
    """The detector trained into ``run_dir`` by :func:`train_detector`, on ``device`` (default: CUDA
    when available, else the CPU). :class:`PapyriError` with the reason for a directory that is not
    a detector run directory, or one whose weights do not fit its configuration."""
    config = read_run_config(run_dir)
    run_dir = Path(run_dir)
    entry = DETECTORS.get(config.get('detector'), PapyriError, f'{run_dir}/{CONFIG_NAME}: detector')
    device = resolve_device(device)
    if entry['backend'] == 'ultralytics':
        from .yolo import load_yolo
        return load_yolo(run_dir, config, device)
    weights = run_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise PapyriError(f'{run_dir} has no {WEIGHTS_NAME} yet: its training has not finished an epoch')
    from ..rundir import ModelLoadError, load_state_dict_file
    model = build_detector_model(entry.name, config.get('args'))
    try:
        model.load_state_dict(load_state_dict_file(weights))
    except (ModelLoadError, RuntimeError) as e:
        raise PapyriError(f'{weights} does not fit the detector its {CONFIG_NAME} describes: '
                          f'{str(e).splitlines()[0]}') from None
    return TorchvisionDetector(entry.name, model.to(device).eval(), config['tile'], config['overlap'], device,
                               run_dir, config)


# ------------------------------------------------------------------------------------------ evaluation
def to_coco_results(detections: Detections, image_id: int) -> list:
    """The detections of one image as a COCO results list (competition category ids, ``bbox``
    ``[x, y, w, h]``); boxes of zero width or height are left out."""
    out = []
    for (x1, y1, x2, y2), score, label in zip(detections.boxes, detections.scores, detections.labels):
        if x2 > x1 and y2 > y1:
            out.append({'image_id': int(image_id), 'category_id': CATEGORY_IDS[int(label)],
                        'bbox': [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], 'score': float(score)})
    return out


def evaluate_detector(detector: Detector, pages: Pages) -> dict:
    """The organisers' metric (:func:`~deitlab.papyri.metric.evaluate`: detection and recognition,
    bt3 ground truth removed, maxDets 10000) of ``detector`` on every page of ``pages``."""
    from .coco import coco_json
    from .metric import evaluate
    predictions = []
    for k, image in enumerate(pages.coco.images):
        predictions += to_coco_results(detector.predict(load_page(pages, k)), image.id)
    return evaluate(coco_json(pages.coco), predictions)


# ------------------------------------------------------------------------------------------ training
class DetectionLoss(Hooks):
    """The forward of a torchvision detector in training mode, ``model(images, targets)``, which
    returns its loss parts (FCOS: classification, bbox_regression, bbox_ctrness); the loss is their
    sum. Each part's mean over the epoch goes into the epoch's row as ``loss_<part>``."""

    def __init__(self):
        self.sums: dict = {}
        self.count = 0

    def before_epoch(self, epoch: int) -> None:
        self.sums, self.count = {}, 0

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        return model(list(x), unpack_targets(y))

    def loss(self, x: torch.Tensor, outputs: dict, y: torch.Tensor) -> torch.Tensor:
        for name, value in outputs.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.count += 1
        return sum(outputs.values())

    def after_epoch(self, epoch: int, row: dict) -> None:
        row.update({f'loss_{name}': float(total) / max(1, self.count) for name, total in self.sums.items()})


class DetectorEpochs(EpochRecords):
    """Before an epoch: the crops of that epoch. After it: validation mAP (when there are ``val``
    pages), one row of ``metrics.jsonl``, the weights, an atomic checkpoint."""

    def __init__(self, cfg: DetectorConfig, out: Path, crops: PageCrops, val: Optional[Pages], steps: int,
                 time_before: float = 0.0, cpu_before: float = 0.0):
        super().__init__(out / METRICS_NAME, time_before, cpu_before)
        self.cfg, self.out, self.crops, self.val, self.steps = cfg, out, crops, val, steps

    def before_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        if self.val is not None:
            res = evaluate_detector(TorchvisionDetector(self.cfg.detector, t.model, self.cfg.tile, self.cfg.overlap,
                                                        t.device), self.val)
            for task in ('detection', 'recognition'):
                row.update({f'val_{task}_mAP50': res[task]['mAP50'], f'val_{task}_mAP': res[task]['mAP']})
        val = (f'  val detection mAP@.5 {row["val_detection_mAP50"]:.3f}, recognition mAP@.5 '
               f'{row["val_recognition_mAP50"]:.3f}' if self.val is not None else '')
        _log(f'epoch {epoch + 1}: loss {row["train_loss"]:.4f}{val}')
        self.record(row)
        atomic_save_safetensors(t.model.state_dict(), self.out / WEIGHTS_NAME)
        atomic_torch_save(dict(t.state_dict(), epoch=epoch, config=self.cfg.to_dict(), steps_per_epoch=self.steps,
                               train_time_s=self.train_time(), train_cpu_s=self.train_cpu()),
                          self.out / CHECKPOINT_NAME)


def _prepare_out(cfg: DetectorConfig) -> Path:
    """``cfg.out``, checked: refuse a file, a checkpoint without ``resume`` / ``overwrite``, and a
    directory holding anything but this run's files without ``overwrite``."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PapyriError(f'--out {out} is a file, not a directory')
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not cfg.resume and not cfg.overwrite:
        raise PapyriError(f'{out} already holds a detector checkpoint; pass --resume to continue it, --overwrite to '
                          f'replace it, or choose another --out')
    own = {METRICS_NAME}
    if (out / CONFIG_NAME).is_file() and _is_detector_config(out):
        own.add(CONFIG_NAME)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if foreign and not cfg.overwrite and not (cfg.resume and ckpt.exists()):
        shown = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
        raise PapyriError(f'--out {out} is not empty ({shown}) and holds no detector checkpoint to --resume; choose '
                          f'another --out, or pass --overwrite to replace what is there')
    if cfg.overwrite and not cfg.resume:
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_detector_config(out: Path) -> bool:
    """Whether ``out``'s config.json is a detector run's (an earlier run of this command)."""
    try:
        read_run_config(out)
    except PapyriError:
        return False
    return True


def _load_checkpoint(cfg: DetectorConfig, out: Path) -> Optional[dict]:
    path = out / CHECKPOINT_NAME
    ckpt = load_resume_checkpoint(path, cfg.resume, PapyriError, _log)
    if ckpt is None:
        return None
    check_resume_settings(ckpt.get('config', {}), cfg, _RESUME_KEYS, path,
                          'resume with its settings, or train into a new --out')
    return ckpt


def _resume(ckpt: Optional[dict], trainer: Trainer, out: Path) -> int:
    """The first epoch to run: after the checkpoint's (its rows of ``metrics.jsonl`` kept), else 0."""
    metrics = out / METRICS_NAME
    if ckpt is None:
        metrics.unlink(missing_ok=True)
        return 0
    trainer.load_state_dict(ckpt)
    start = int(ckpt['epoch']) + 1
    if metrics.exists():
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get('epoch', 0) <= start]
        atomic_write_bytes(metrics, ''.join(ln + '\n' for ln in keep).encode())
    _log(f'resuming {out} after epoch {start}')
    return start


def _builder_args(cfg: DetectorConfig) -> dict:
    """The constructor arguments the settings choose (the rest are the builder's defaults)."""
    return dict(min_size=cfg.min_size, max_size=cfg.max_size, score_thresh=cfg.score_thresh,
                detections=cfg.detections)


def _run_config(cfg: DetectorConfig, model: nn.Module, train: Pages, val: Optional[Pages], steps: int) -> dict:
    args = model.detector_args
    return {'kind': KIND, 'format': 1, 'detector': cfg.detector, 'backend': DETECTORS[cfg.detector]['backend'],
            'args': args, 'classes': {'letters': list(LETTERS), 'names': list(NAMES),
                                      'category_ids': list(CATEGORY_IDS)},
            'tile': cfg.tile, 'overlap': cfg.overlap,
            'input': {'image': 'RGB, float (3, H, W) in [0, 1]', 'mean': args['image_mean'], 'std': args['image_std'],
                      'rescale': None if args['min_size'] is None else [args['min_size'], args['max_size']]},
            'data': {'train': train.describe(), 'val': None if val is None else val.describe()},
            'training': dict(cfg.to_dict(), steps_per_epoch=steps)}


def _steps_per_epoch(cfg: DetectorConfig, pages: Pages) -> int:
    """``cfg.steps``, or (0) as many batches of crops as cover the pages' area once."""
    if cfg.steps:
        return cfg.steps
    area = sum(im.width * im.height for im in pages.coco.images)
    return max(1, math.ceil(area / (cfg.tile ** 2 * cfg.batch_size)))


def train_detector(cfg: DetectorConfig, hooks: Sequence = ()) -> dict:
    """Train the detector ``cfg.detector`` on ``cfg.data`` into the run directory ``cfg.out`` (the
    module's docstring); returns the summary, also written to ``summary.json``. ``hooks``: more
    :class:`~deitlab.train.loop.Hooks` for the trainer, run after the method's own."""
    cfg.validate()
    if DETECTORS[cfg.detector]['backend'] == 'ultralytics':
        from .yolo import train_yolo
        return train_yolo(cfg)
    device = resolve_device(cfg.device)
    train_pages = read_pages(cfg.data, 'data')
    val_pages = read_pages(cfg.val, 'val') if cfg.val is not None else None
    if not train_pages.num_boxes:
        raise PapyriError(f'data: {train_pages.source} has no letter boxes to train on')
    out = _prepare_out(cfg)
    ckpt = _load_checkpoint(cfg, out)
    seed_all(cfg.seed)
    model = build_detector_model(cfg.detector, _builder_args(cfg)).to(device)
    steps = _steps_per_epoch(cfg, train_pages)
    crops = PageCrops(train_pages, cfg.tile, steps * cfg.batch_size, cfg.seed, cfg.jitter, cfg.min_visible)
    loader = torch.utils.data.DataLoader(crops, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                                         collate_fn=collate_crops, drop_last=True, pin_memory=device.type == 'cuda')
    total = cfg.epochs * steps

    def schedule(opt):
        from timm.scheduler import CosineLRScheduler
        return CosineLRScheduler(opt, t_initial=total, lr_min=cfg.lr * 1e-2, warmup_t=int(cfg.warmup * total),
                                 warmup_lr_init=cfg.lr * 1e-2, t_in_epochs=False)

    trainer = Trainer(model, dict(opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay), scheduler=schedule,
                      device=device, amp=cfg.amp, grad_clip=cfg.grad_clip or None, progress=cfg.progress,
                      postfix_every=10)
    start = _resume(ckpt, trainer, out)
    epochs = DetectorEpochs(cfg, out, crops, val_pages, steps, *(
        (float(ckpt.get('train_time_s', 0.0)), float(ckpt.get('train_cpu_s', 0.0))) if ckpt else (0.0, 0.0)))
    del ckpt
    trainer.add_hooks(DetectionLoss(), epochs, *hooks)
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(_run_config(cfg, model, train_pages, val_pages, steps),
                                                     indent=2, ensure_ascii=False).encode('utf-8'))
    params = sum(p.numel() for p in model.parameters())
    _log(f'{cfg.detector}: {params / 1e6:.2f}M params; {len(train_pages)} pages, {train_pages.num_boxes} boxes; '
         f'{steps} updates of {cfg.batch_size} crops of {cfg.tile} px per epoch; on {device}')
    trainer.fit(loader, cfg.epochs, start, steps)
    last = epochs.last_row
    if not last and (out / METRICS_NAME).exists():   # a finished run resumed: nothing left to train
        rows = [json.loads(ln) for ln in (out / METRICS_NAME).read_text().splitlines() if ln.strip()]
        last = rows[-1] if rows else {}
    summary = dict(run_dir=str(out), detector=cfg.detector, data=str(train_pages.source),
                   val=None if val_pages is None else str(val_pages.source), epochs=cfg.epochs, steps_per_epoch=steps,
                   updates=cfg.epochs * steps, train_images=len(train_pages), train_boxes=train_pages.num_boxes,
                   params=params, tile=cfg.tile, overlap=cfg.overlap, train_time_s=epochs.train_time(),
                   train_cpu_s=epochs.train_cpu(), weights=str(out / WEIGHTS_NAME),
                   **{k: v for k, v in last.items() if k.startswith(('loss_', 'val_')) or k == 'train_loss'})
    atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    return summary
