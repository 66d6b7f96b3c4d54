"""YOLOv8 glyph detectors through ultralytics, the detectors of Turnbull & Mannix (IJDAR 2024):
``deitlab papyri train-detector --detector yolov8n`` (or ``yolov8s``, ``yolov8m``).

**Licence.** ultralytics is AGPL-3.0: it is the optional extra ``yolo`` (``pip install
'deitlab[yolo]'``), imported only when a YOLO detector is trained or loaded, never by the rest of
deitlab. Whoever distributes or serves a program using it takes on the AGPL's terms for the
combination; the default detector (:mod:`.detectors`) is permissive.

**Offline.** Before ultralytics is first imported, the process environment gets ``YOLO_OFFLINE=1``
(no telemetry, no update checks), ``YOLO_AUTOINSTALL=false`` (no pip installs) and a private
``YOLO_CONFIG_DIR`` (a temporary directory, removed at exit) holding matplotlib's DejaVu Sans, which
draws Greek, as ``Arial.ttf`` and ``Arial.Unicode.ttf``, where ultralytics looks for its fonts
before it would download them. The model is built from ``yolov8{n,s,m}.yaml`` (random weights:
nothing is downloaded), trained with ``amp=False`` on the CPU (on CUDA bf16, which skips
ultralytics' AMP check and the weights it fetches for it), ``plots=False``, no horizontal flips
(``fliplr=0``: a mirrored letter is another shape) and class names in ASCII (``alpha`` ...
``omega``).

**Data.** YOLO reads images and label files (``class cx cy w h``, normalised): every page of the
data is cut into the tiles it will be predicted in (:func:`~deitlab.papyri.tiling.tile_grid`, the
run's tile size and overlap), each tile's boxes clipped, those keeping ``min_visible`` of their area
(as :class:`~deitlab.papyri.detect_data.PageCrops`), and written under ``RUN/yolo_data`` with a
dataset yaml; ``imgsz`` is the tile size, so glyphs keep their scale. Ultralytics' own run
(``args.yaml``, ``results.csv``, its checkpoints) is ``RUN/yolo``; the trained weights are also
``RUN/model.safetensors``, from which :func:`load_yolo` rebuilds the network (no pickle). An epoch
is one pass over the tiles (``steps`` is not used); ``metrics.jsonl`` holds ultralytics' per-epoch
losses and its mAP on the validation tiles; ``summary.json`` the organisers' metric on the
validation pages, predicted tile by tile through :class:`YoloDetector`.
"""
from __future__ import annotations

import atexit
import contextlib
import csv
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..console import is_quiet, log as _log
from ..registry import DETECTORS
from ..rundir import CONFIG_NAME, WEIGHTS_NAME, atomic_save_safetensors, atomic_write_bytes
from .alphabet import CATEGORY_IDS, LETTERS, NAMES, NUM_CLASSES
from .config import DetectorConfig, PapyriError
from .detect import KIND, METRICS_NAME, SUMMARY_NAME, Detector, evaluate_detector
from .detect_data import Pages, load_page, read_pages
from .fusion import Detections
from .tiling import tile_grid

__all__ = ['INSTALL_HINT', 'ultralytics_yolo', 'export_yolo', 'YoloDetector', 'train_yolo', 'load_yolo']

INSTALL_HINT = "pip install 'deitlab[yolo]'"
IOU = 0.7   # ultralytics' NMS IoU


def ultralytics_yolo():
    """ultralytics' ``YOLO`` class, imported offline (the module's docstring); :class:`PapyriError`
    naming the extra when ultralytics is not installed."""
    if 'ultralytics' not in sys.modules:
        if importlib.util.find_spec('ultralytics') is None:
            raise PapyriError(f'the YOLO detectors need ultralytics (AGPL-3.0), which is not installed: {INSTALL_HINT}')
        import matplotlib
        config_dir = Path(tempfile.mkdtemp(prefix='deitlab-yolo-'))
        atexit.register(shutil.rmtree, config_dir, True)
        font = Path(matplotlib.get_data_path()) / 'fonts' / 'ttf' / 'DejaVuSans.ttf'
        for name in ('Arial.ttf', 'Arial.Unicode.ttf'):
            shutil.copyfile(font, config_dir / name)
        os.environ.update(YOLO_OFFLINE='1', YOLO_AUTOINSTALL='false', YOLO_CONFIG_DIR=str(config_dir))
        with contextlib.redirect_stdout(sys.stderr):   # the messages of its first import (a new settings file)
            importlib.import_module('ultralytics')   # sets up its logger
        for handler in logging.getLogger('ultralytics').handlers:   # log lines to stderr, as deitlab's
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    from ultralytics import YOLO
    return YOLO


@contextlib.contextmanager
def _output(show: bool):
    """ultralytics' progress bars (which write to stdout) on stderr, and its log lines and bars off
    unless ``show``: stdout stays for the command's result."""
    logger = logging.getLogger('ultralytics')
    level = logger.level
    if not show:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def _device(device: torch.device) -> str:
    """A torch device as ultralytics names it (``cpu``, ``0``, ``mps``)."""
    return str(device.index or 0) if device.type == 'cuda' else device.type


def export_yolo(pages: Pages, dest: Path, split: str, tile: int, overlap: int, min_visible: float) -> int:
    """The tiles of every page of ``pages`` as ``dest/images/SPLIT/*.png`` with YOLO label files
    ``dest/labels/SPLIT/*.txt`` (the module's docstring); returns the number of tiles."""
    images, labels = dest / 'images' / split, dest / 'labels' / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    count = 0
    for k, im in enumerate(pages.coco.images):
        page = load_page(pages, k).permute(1, 2, 0).numpy()
        boxes, classes = pages.boxes[k], pages.labels[k]
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        for t in tile_grid(im.height, im.width, tile, overlap):
            w, h = t.x1 - t.x0, t.y1 - t.y0
            clipped = np.clip(boxes - np.array([t.x0, t.y0, t.x0, t.y0], dtype=np.float32), 0, [w, h, w, h])
            seen = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
            keep = (seen >= min_visible * area) & (seen > 0)
            name = f'{k:05d}_{t.y0}_{t.x0}'
            Image.fromarray(np.ascontiguousarray(page[t.y0:t.y1, t.x0:t.x1])).save(images / f'{name}.png')
            rows = [f'{c} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} '
                    f'{(b[3] - b[1]) / h:.6f}' for b, c in zip(clipped[keep], classes[keep])]
            (labels / f'{name}.txt').write_text(''.join(r + '\n' for r in rows))
            count += 1
    return count


class YoloDetector(Detector):
    """An ultralytics YOLO model as a :class:`~deitlab.papyri.detect.Detector`: each tile is
    predicted at ``imgsz`` = the tile size with the run's score threshold and detection limit."""

    def __init__(self, name: str, yolo, tile: int, overlap: int, device: torch.device, args: dict, run_dir=None,
                 config=None):
        super().__init__(name, tile, overlap, run_dir, config)
        self.yolo, self.device, self.args = yolo, torch.device(device), dict(args)

    def predict_tile(self, image: torch.Tensor) -> Detections:
        rgb = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        with _output(False):
            res = self.yolo.predict(np.ascontiguousarray(rgb[:, :, ::-1]), imgsz=self.args['imgsz'],   # BGR, as cv2
                                    conf=self.args['conf'], iou=self.args['iou'], max_det=self.args['max_det'],
                                    device=_device(self.device), verbose=False)[0]
        return Detections(res.boxes.xyxy, res.boxes.conf, res.boxes.cls)


def _check(cfg: DetectorConfig) -> None:
    unsupported = [(cfg.tile % 32 != 0, f'--tile must be a multiple of 32 for YOLO (its largest stride), got '
                                        f'{cfg.tile}'),
                   (cfg.steps != 0, 'YOLO trains whole epochs over the tiles: leave --steps at 0'),
                   (cfg.min_size is not None, "--min-size / --max-size are torchvision's rescaling; YOLO sees each "
                                              'tile at --tile'),
                   (cfg.resume, '--resume is not supported for YOLO detectors: train into a new --out')]
    for bad, message in unsupported:
        if bad:
            raise PapyriError(f'{cfg.detector}: {message}')


def _metrics_rows(results_csv: Path) -> list:
    """ultralytics' ``results.csv`` as rows of ``metrics.jsonl`` (numbers as floats, keys stripped)."""
    if not results_csv.is_file():
        return []
    with open(results_csv, newline='') as f:
        return [{k.strip(): (int(float(v)) if k.strip() == 'epoch' else float(v)) for k, v in row.items() if v}
                for row in csv.DictReader(f)]


def train_yolo(cfg: DetectorConfig) -> dict:
    """Train the YOLO detector ``cfg.detector`` (the module's docstring) into ``cfg.out``; returns the
    summary (also ``summary.json``). Called by :func:`~deitlab.papyri.detect.train_detector`."""
    from .detect import _prepare_out
    _check(cfg)
    YOLO = ultralytics_yolo()
    from ..distributed import resolve_device
    device = resolve_device(cfg.device)
    train_pages = read_pages(cfg.data, 'data')
    val_pages = read_pages(cfg.val, 'val') if cfg.val is not None else None
    out = _prepare_out(cfg).resolve()
    data_dir = out / 'yolo_data'
    for old in (data_dir, out / 'yolo'):   # an earlier run's, with --overwrite
        shutil.rmtree(old, ignore_errors=True)
    tiles = export_yolo(train_pages, data_dir, 'train', cfg.tile, cfg.overlap, cfg.min_visible)
    if val_pages is not None:
        export_yolo(val_pages, data_dir, 'val', cfg.tile, cfg.overlap, cfg.min_visible)
    yaml_path = data_dir / 'data.yaml'
    names = ''.join(f'  {i}: {n}\n' for i, n in enumerate(NAMES))
    yaml_path.write_text(f'path: {data_dir}\ntrain: images/train\nval: images/{"val" if val_pages else "train"}\n'
                         f'names:\n{names}')
    entry = DETECTORS[cfg.detector]
    args = dict(yaml=entry['yaml'], num_classes=NUM_CLASSES, names=list(NAMES), imgsz=cfg.tile,
                conf=cfg.score_thresh, iou=IOU, max_det=cfg.detections)
    config = {'kind': KIND, 'format': 1, 'detector': cfg.detector, 'backend': 'ultralytics', 'args': args,
              'classes': {'letters': list(LETTERS), 'names': list(NAMES), 'category_ids': list(CATEGORY_IDS)},
              'tile': cfg.tile, 'overlap': cfg.overlap,
              'input': {'image': 'RGB, float (3, H, W) in [0, 1]; to ultralytics as BGR uint8, letterboxed to imgsz'},
              'data': {'train': train_pages.describe(), 'val': None if val_pages is None else val_pages.describe()},
              'training': cfg.to_dict()}
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False).encode('utf-8'))
    _log(f'{cfg.detector}: {len(train_pages)} pages as {tiles} tiles of {cfg.tile} px; on {device} (ultralytics, '
         f'AGPL-3.0)')
    torch.manual_seed(cfg.seed)
    yolo = YOLO(entry['yaml'])
    t0, c0 = time.perf_counter(), time.process_time()
    opt = {'adamw': 'AdamW', 'adam': 'Adam', 'sgd': 'SGD'}.get(cfg.opt.lower(), 'auto')
    with _output(cfg.progress is not False and not is_quiet()):
        yolo.train(data=str(yaml_path), epochs=cfg.epochs, imgsz=cfg.tile, batch=cfg.batch_size, device=_device(device),
                   workers=cfg.workers, pretrained=False, amp='bf16' if cfg.amp and device.type == 'cuda' else False,
                   plots=False, fliplr=0.0, project=str(out), name='yolo', exist_ok=True, seed=cfg.seed,
                   deterministic=True, val=val_pages is not None, optimizer=opt, lr0=cfg.lr,
                   weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup * cfg.epochs, max_det=cfg.detections,
                   verbose=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    net = yolo.model.float().eval()
    atomic_save_safetensors(net.state_dict(), out / WEIGHTS_NAME)
    rows = _metrics_rows(out / 'yolo' / 'results.csv')
    atomic_write_bytes(out / METRICS_NAME, ''.join(json.dumps(r) + '\n' for r in rows).encode())
    summary = dict(run_dir=str(out), detector=cfg.detector, data=str(train_pages.source),
                   val=None if val_pages is None else str(val_pages.source), epochs=cfg.epochs,
                   train_images=len(train_pages), train_tiles=tiles, train_boxes=train_pages.num_boxes,
                   params=sum(p.numel() for p in net.parameters()), tile=cfg.tile, overlap=cfg.overlap,
                   train_time_s=seconds, train_cpu_s=cpu, weights=str(out / WEIGHTS_NAME))
    if val_pages is not None:
        res = evaluate_detector(YoloDetector(cfg.detector, yolo, cfg.tile, cfg.overlap, device, args), val_pages)
        for task in ('detection', 'recognition'):
            summary.update({f'val_{task}_mAP50': res[task]['mAP50'], f'val_{task}_mAP': res[task]['mAP']})
    atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    return summary


def load_yolo(run_dir: Path, config: dict, device: torch.device) -> YoloDetector:
    """The YOLO detector of a run directory: the network rebuilt from its yaml and
    ``model.safetensors`` (called by :func:`~deitlab.papyri.detect.load_detector`)."""
    weights = Path(run_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise PapyriError(f'{run_dir} has no {WEIGHTS_NAME}: its training has not finished')
    YOLO = ultralytics_yolo()
    from ultralytics.nn.tasks import DetectionModel
    from ..rundir import load_state_dict_file
    args = config['args']
    with _output(False):
        net = DetectionModel(args['yaml'], nc=args['num_classes'], verbose=False)
        try:
            net.load_state_dict(load_state_dict_file(weights))
        except RuntimeError as e:
            raise PapyriError(f'{weights} does not fit {args["yaml"]}: {str(e).splitlines()[0]}') from None
        net.names = dict(enumerate(args['names']))
        yolo = YOLO(args['yaml'])
        yolo.model = net.eval()
    return YoloDetector(config['detector'], yolo, config['tile'], config['overlap'], device, args, run_dir, config)
