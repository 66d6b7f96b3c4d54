"""Crop classifiers as refiners of the detected letters, and the refinement of predicted pages.

In Turnbull & Mannix's pipeline (IJDAR 2024) every box the detectors agree on is cut out and
re-classified by two classifiers, a supervised DeiT and a SimCLR-pretrained ResNet-50 fine-tuned on
the letters, and the detector and the two classifiers vote (:mod:`.vote`). Here a refiner is any
classification run directory that ``deitlab train`` wrote on a crops dataset of ``deitlab papyri
crops`` (``deitlab train --data folder:CROPS``), so every deitlab or timm architecture and every
recipe (distillation, mixing, ...) can be one:

* :func:`load_refiner` rebuilds the model from its run directory, maps its classes (the crop
  folders ``00-alpha`` ... ``23-omega``, recorded as the run's ``label_names``) to the 24 letters, and
  takes the **crop policy** (margin, size) from the manifest of the crops it was trained on (the
  ``folder:`` spec of its ``train_config.json``), so its crops at inference are cut exactly as its
  training crops were (:func:`~deitlab.papyri.crops.crop_glyph`). When that manifest cannot be read
  the default policy is used, with a warning; ``policy`` sets it explicitly.
* :meth:`Refiner.classify` cuts the boxes of a page, feeds them as ``deitlab train`` fed the
  validation crops (resized to the model's input, its normalisation) and returns the letter
  probabilities ``(N, 24)`` (softmax; a letter the model has no class for gets 0).
* :func:`refine_pages` re-labels and re-scores the boxes of predicted pages
  (:class:`~deitlab.papyri.predict.PagePrediction`) by the vote, keeping every member's letter for
  the output files.

A detector run directory, a SimCLR backbone that has not been fine-tuned (no classifier) and a
classifier of other classes are refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..console import log, progress
from ..rundir import CONFIG_NAME
from .alphabet import LETTERS, NUM_CLASSES
from .config import PapyriError
from .crops import CropPolicy, crop_glyphs, letter_of_folder, read_crop_manifest
from .fusion import Detections
from .vote import VoteConfig, vote

__all__ = ['Refiner', 'load_refiner', 'load_refiners', 'refine_pages', 'TRAIN_CONFIG_NAME']

#: The resolved settings ``deitlab train`` writes into its run directory (its data spec among them).
TRAIN_CONFIG_NAME = 'train_config.json'


@dataclass
class Refiner:
    """A crop classifier (the module's docstring): ``model`` in eval mode on ``device``, ``letters[i]``
    the letter of its class ``i``, the ``policy`` its crops are cut with, its input ``size`` and
    normalisation ``mean`` / ``std``."""
    name: str
    model: nn.Module
    letters: np.ndarray
    policy: CropPolicy
    size: int
    mean: tuple
    std: tuple
    device: torch.device
    run_dir: Optional[Path] = None
    batch_size: int = 256

    def __post_init__(self):
        from ..data.transforms import build_pil_transform
        self.transform = build_pil_transform('none', img_size=self.size, in_chans=3, mean=self.mean, std=self.std,
                                             hflip=0.0)

    @torch.inference_mode()
    def classify(self, page: Image.Image, boxes) -> np.ndarray:
        """The letter probabilities ``(N, 24)`` of the ``boxes`` (``(N, 4)`` xyxy pixels) of ``page``."""
        crops = crop_glyphs(page, boxes, self.policy)
        out = np.zeros((len(crops), NUM_CLASSES))
        self.model.eval()
        for start in range(0, len(crops), self.batch_size):
            x = torch.stack([self.transform(c) for c in crops[start:start + self.batch_size]]).to(self.device)
            p = torch.softmax(self.model(x).float(), dim=1).cpu().numpy()
            out[start:start + len(p), self.letters] = p
        return out


def _letters_of(label_names, run_dir: Path) -> np.ndarray:
    letters = [letter_of_folder(str(n)) for n in label_names]
    unknown = [n for n, k in zip(label_names, letters) if k is None]
    if unknown:
        raise PapyriError(f'{run_dir} classifies {", ".join(map(str, unknown[:4]))}{", ..." if len(unknown) > 4 else ""}, '
                          f'not letters: a refiner is trained on crops of deitlab papyri crops (classes 00-alpha ... '
                          f'23-omega)')
    if len(set(letters)) != len(letters):
        raise PapyriError(f'{run_dir}: two of its classes name the same letter ({", ".join(map(str, label_names))})')
    return np.array(letters, dtype=np.int64)


def crop_policy_of(run_dir: Path) -> Optional[CropPolicy]:
    """The crop policy of the crops a classification run was trained on (its ``train_config.json``'s
    ``folder:`` spec, that directory's manifest), or None when it cannot be read."""
    try:
        spec = json.loads((run_dir / TRAIN_CONFIG_NAME).read_text(encoding='utf-8')).get('data', '')
    except (OSError, ValueError, AttributeError):
        return None
    name, _, path = str(spec).partition(':')
    manifest = read_crop_manifest(Path(path).expanduser()) if name.strip() == 'folder' and path else None
    if manifest is None:
        return None
    crop = manifest.get('crop') or {}
    return CropPolicy(float(crop.get('margin', 0.15)), int(crop.get('size', 64)))


def load_refiner(run_dir, name: Optional[str] = None, device=None, policy: Optional[CropPolicy] = None) -> Refiner:
    """The refiner of the classification run directory ``run_dir`` (the module's docstring) on
    ``device`` (default: CUDA when available, else the CPU)."""
    from ..data.for_model import model_input, norm_stats
    from ..distributed import resolve_device
    from ..rundir import ModelLoadError, create
    run_dir = Path(run_dir)
    name = name or run_dir.name
    if not run_dir.is_dir() or not (run_dir / CONFIG_NAME).is_file():
        what = 'does not exist' if not run_dir.exists() else f'is not a run directory (no {CONFIG_NAME})'
        raise PapyriError(f'refiner {name}: {run_dir} {what}; give a directory written by deitlab train on crops')
    try:
        config = json.loads((run_dir / CONFIG_NAME).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise PapyriError(f'refiner {name}: {run_dir / CONFIG_NAME} is not JSON ({e})') from None
    if not isinstance(config, dict) or config.get('kind') == 'papyri-detector':
        raise PapyriError(f'refiner {name}: {run_dir} is a detector run directory, not a crop classifier; give a '
                          f'directory written by deitlab train on crops (--data folder:CROPS)')
    if not config.get('num_classes'):
        raise PapyriError(f'refiner {name}: {run_dir} has no classifier (num_classes {config.get("num_classes")}), '
                          f'e.g. a SimCLR backbone: fine-tune it first with deitlab train --model {run_dir} --data '
                          f'folder:CROPS --out RUN')
    labels = config.get('label_names') or []
    if len(labels) != config['num_classes']:
        raise PapyriError(f'refiner {name}: {run_dir} records {len(labels)} class names for {config["num_classes"]} '
                          f'classes; a refiner must know which letter each class is (train it on deitlab papyri crops)')
    letters = _letters_of(labels, run_dir)
    device = resolve_device(device)
    try:
        model = create(str(run_dir))
    except ModelLoadError as e:
        raise PapyriError(f'refiner {name}: {e}') from None
    if policy is None:
        policy = crop_policy_of(run_dir)
        if policy is None:
            policy = CropPolicy()
            log(f'warning: refiner {name}: the crops {run_dir} was trained on (its {TRAIN_CONFIG_NAME}) have no '
                f'readable manifest; cutting crops with the default margin {policy.margin} and size {policy.size}')
    chans, size = model_input(model)
    if chans != 3:
        raise PapyriError(f'refiner {name}: {run_dir} takes {chans}-channel input; crops are RGB')
    mean, std = norm_stats(model, chans)
    if hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(False)   # a distilled DeiT: the mean of its two heads
    return Refiner(name, model.to(device).eval(), letters, policy, size, mean, std, device, run_dir)


def load_refiners(pairs: Sequence[Tuple[str, str]], device=None) -> List[Refiner]:
    """:func:`load_refiner` of each ``(name, run directory)``."""
    return [load_refiner(path, name, device) for name, path in pairs]


def refine_pages(pages: Sequence, refiners: Sequence[Refiner], config: VoteConfig = VoteConfig(),
                 progress_bar: Optional[bool] = False) -> list:
    """The pages (:class:`~deitlab.papyri.predict.PagePrediction`) with every box re-labelled and
    re-scored by the vote of their detector and ``refiners`` (:func:`~deitlab.papyri.vote.vote`), best
    score first; each page's ``votes`` holds every member's letter per box (``detector`` first)."""
    refiners = list(refiners)
    config.validate(1 + len(refiners))
    names = ['detector'] + [r.name for r in refiners]
    out = []
    for page in progress(progress_bar, iterable=list(pages), desc='refine', unit='page'):
        d = page.detections
        if page.blank or not len(d):
            out.append(replace(page, votes={n: [] for n in names}))
            continue
        with Image.open(page.path) as im:
            image = im.convert('RGB')
        result = vote(d.labels, d.scores, [r.classify(image, d.boxes) for r in refiners], config)
        order = np.argsort(-result.scores, kind='stable')
        votes = {n: [LETTERS[k] for k in result.member_labels[i][order]] for i, n in enumerate(names)}
        out.append(replace(page, detections=Detections(d.boxes[order], result.scores[order], result.labels[order]),
                           votes=votes))
    return out
