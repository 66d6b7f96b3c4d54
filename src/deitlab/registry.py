"""Registries: the token-fusion methods, batch-mix modes, saliency criteria, prunable model
families and glyph detectors deitlab knows, each named in one place with its options, cost formula and defaults.

Code that offers a choice reads it here: the CLI's sub-commands, choices and ``--help`` lines, the
configs' validation, the dispatchers (``apply_token_fusion``, ``BatchMixer``, ``Saliency``,
``layout_of``). An entry names its implementation as ``'module:attribute'`` and imports it only
when it is used, so this module imports neither torch nor timm and ``deitlab --help`` stays fast.

Adding a token-fusion method is one new file plus one line here. Say the method is "foo":

1. ``src/deitlab/tokens/foo.py`` defines ``apply_foo(model, r, layers=None, **options)``, which
   patches the model in place with a ``tokens.patch.TokenFusion`` subclass (see ``tokens/tome.py``)
   and returns it;
2. one registration below::

       TOKEN_FUSION.register('foo', 'deitlab.tokens.foo:apply_foo', help='Foo: ...', default_r=8,
                             cost='tome')

``deitlab fuse foo``, ``deitlab train --token-fusion foo`` and ``apply_token_fusion(model, 'foo')``
then work; ``cost`` names the closed-form MACs of ``tokens.schedule.fusion_macs`` that describe
what one block does (a new cost formula is a new branch there).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Type

__all__ = ['Entry', 'Registry', 'load_target', 'TOKEN_FUSION', 'MIX_MODES', 'SALIENCY', 'PRUNABLE', 'VITRES_STEMS', 'DETECTORS']


def load_target(spec: str) -> Any:
    """The object ``'package.module:attr'`` names (the module is imported now)."""
    module, _, attr = spec.partition(':')
    obj = importlib.import_module(module)
    for part in attr.split('.'):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Entry:
    """One registered choice: its ``name``, the ``target`` that implements it (``'module:attr'``),
    a one-line ``help`` and any further facts (defaults, options, cost formula) in ``info``."""
    name: str
    target: Optional[str]
    help: str
    info: Dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        """The implementation (imported now)."""
        if self.target is None:
            raise LookupError(f'{self.name!r} has no implementation to load')
        return load_target(self.target)

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)


class Registry:
    """Named entries of one kind, in registration order (the order ``--help`` lists them in)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, target: Optional[str], help: str, **info: Any) -> Entry:
        """Add ``name``; a second registration of a name is an error."""
        if name in self._entries:
            raise ValueError(f'{self.kind} {name!r} is registered twice')
        entry = Entry(name, target, help, dict(info))
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> Entry:
        """Remove ``name`` (a plug-in's test, or replacing a method) and return its entry."""
        return self._entries.pop(self.get(name).name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, **where: Any) -> tuple:
        """The names, in order; with ``where``, those whose ``info`` has these values."""
        return tuple(e.name for e in self if all(e.info.get(k) == v for k, v in where.items()))

    def __getitem__(self, name: str) -> Entry:
        return self.get(name)

    def get(self, name: str, error: Type[Exception] = ValueError, what: Optional[str] = None) -> Entry:
        """The entry of ``name``, or ``error`` naming the choices (``what`` names the setting)."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise error(f'{what or self.kind} must be one of {", ".join(self.names())}; got {name!r}') from None

    def check(self, name: str, error: Type[Exception] = ValueError, what: Optional[str] = None) -> str:
        """``name`` if registered, else ``error`` naming the choices."""
        return self.get(name, error, what).name

    def choices_help(self, sep: str = ' | ') -> str:
        """``'a | b | c'``, for a ``--help`` line."""
        return sep.join(self.names())


# ------------------------------------------------------------------------------ token fusion
#: Token reduction applied to a trained ViT (``deitlab fuse METHOD``, ``train --token-fusion``).
#: ``default_r``: tokens fused per block when ``r`` is not given; ``cost``: the closed form of
#: ``fusion_macs``; ``options``: fixed keyword arguments of the target; ``consistency``: MCTF's
#: token-consistency loss applies when training with it.
TOKEN_FUSION = Registry('token fusion method')
TOKEN_FUSION.register('tome', 'deitlab.tokens.tome:apply_tome', 'ToMe: bipartite token merging on keys',
                      default_r=8, cost='tome', options={}, consistency=False, paper='Bolya et al., ICLR 2023')
TOKEN_FUSION.register('mctf', 'deitlab.tokens.mctf:apply_mctf',
                      'MCTF: multi-criteria token fusion with one-step-ahead attention',
                      default_r=16, cost='mctf', options={'fast': False}, consistency=True, paper='Lee et al., CVPR 2024')
TOKEN_FUSION.register('mctf-fast', 'deitlab.tokens.mctf:apply_mctf', 'MCTF-Fast: fuse 35% of the tokens at three blocks',
                      default_r=0.35, cost='mctf', options={'fast': True}, consistency=True, paper='Lee et al., CVPR 2024')

# ------------------------------------------------------------------------------ batch mixing
#: How a training batch is mixed (``train --mix``); implemented by ``train.mixing.BatchMixer``.
#: ``mixup`` / ``cutmix``: uses that Beta alpha (``--mixup`` / ``--cutmix``); ``maskmix``: draws MaskMix
#: masks; ``attention``: labels from the class token's attention (needs a class token, no fusion);
#: ``patch``: labels every last-stage patch token (needs a patch head, no fusion).
MIX_MODES = Registry('mix')
for _name, _help, _flags in (
        ('none', 'no mixing', ''),
        ('mixup', 'Mixup only (Zhang et al. 2018)', 'mixup'),
        ('cutmix', 'CutMix only (Yun et al. 2019)', 'cutmix'),
        ('mixup-cutmix', "timm's Mixup/CutMix switch (DeiT's recipe)", 'mixup cutmix'),
        ('transmix', 'TransMix: CutMix/Mixup labels from class-token attention (Chen et al. 2022)',
         'mixup cutmix attention'),
        ('maskmix', 'MaskMix: patch-aligned masks, area labels (Zhao et al. 2023)', 'mixup cutmix maskmix'),
        ('mixpro', 'MixPro: MaskMix with progressive attention labels (Zhao et al. 2023)',
         'mixup cutmix maskmix attention'),
        ('patchmix', "patch-token mix: CutMix on the last stage's token grid, a loss on every patch token "
                     "(ViT-ResNAS's release; Gong et al. 2021, Jiang et al. 2021); needs a patch head",
         'cutmix patch')):
    MIX_MODES.register(_name, None, _help,
                       **{k: k in _flags.split() for k in ('mixup', 'cutmix', 'maskmix', 'attention', 'patch')})

# ------------------------------------------------------------------------------ saliency
#: Unit importance for structural pruning (``prune nvit --criterion``); each target is one class
#: in ``prune/saliency.py``. ``data``: what it reads after a backward ('grad', 'per_sample' or None).
SALIENCY = Registry('saliency criterion')
SALIENCY.register('nvit', 'deitlab.prune.saliency:HessianAware',
                  'NViT: E[(sum_S g w)^2], the Hessian-aware group score (Yang et al., CVPR 2023)', data='grad')
SALIENCY.register('taylor', 'deitlab.prune.saliency:Taylor', 'first-order Taylor, E[sum |g w|] (Molchanov et al. 2017)',
                  data='grad')
SALIENCY.register('magnitude', 'deitlab.prune.saliency:Magnitude', 'weight magnitude sum w^2 (no data)', data=None)
SALIENCY.register('fisher', 'deitlab.prune.saliency:Fisher',
                  'diagonal Fisher / OBD, sum w^2 E[g^2] over per-sample gradients', data='per_sample')

# ------------------------------------------------------------------------------ prunable families
#: Model classes the structural pruner handles, with their layout (which units can go, the block
#: kinds of their latency tables); ``layout_of`` checks them in this order.
PRUNABLE = Registry('prunable model family')
PRUNABLE.register('deit', 'deitlab.prune.families:DeiTLayout', 'DeiT / NViT: embedding, heads, q/k, v, MLP widths',
                  classes=('deitlab.models.deit:DeiT', 'deitlab.models.deit:DeiTDistilled'))
PRUNABLE.register('spectformer', 'deitlab.prune.families:SpectFormerLayout', 'SpectFormer: MLP hidden widths',
                  classes=('deitlab.models.spectformer:SpectFormer',))
PRUNABLE.register('poolformer', 'deitlab.prune.families:PoolFormerLayout', 'PoolFormer: MLP hidden widths',
                  classes=('deitlab.models.poolformer:PoolFormer',))

# ------------------------------------------------------------------------------ ViT-Res stems
#: The patch stems of ViT-Res (``ViTRes(stem=...)``, ``SearchSpace.stem``), built by
#: ``models/vitres_stems.build_stem``; ``even_patch``: needs an even patch size dividing the image.
VITRES_STEMS = Registry('ViT-Res stem')
VITRES_STEMS.register('linear', 'timm.layers:PatchEmbed', 'the patch embedding, Conv2d with kernel = stride = patch',
                      even_patch=False)
VITRES_STEMS.register('conv', 'deitlab.models.vitres_stems:ConvStem',
                      "ViT-ResNAS's release: 3x3 conv-BN-ReLU stride 2, a residual pair of 3x3 conv-BN-ReLU, a "
                      "projection with kernel = stride = patch / 2", even_patch=True)

# ------------------------------------------------------------------------------ glyph detectors
#: Detectors of ``deitlab papyri train-detector --detector``. ``backend``: ``torchvision``
#: (permissive, always installed; the target builds the model from its keyword arguments, which the
#: run directory's ``config.json`` saves) or ``ultralytics`` (AGPL-3.0, the optional extra ``extra``;
#: the target is the detector class, ``yaml`` the network's definition); ``paper``: the method's paper.
DETECTORS = Registry('detector')
DETECTORS.register('fcos-r18', 'deitlab.papyri.detectors:build_fcos',
                   'FCOS (anchor-free) on a ResNet-18 FPN with a stride-4 level, from scratch (torchvision, BSD)',
                   backend='torchvision', paper='Tian et al., ICCV 2019')
DETECTORS.register('retinanet-r18', 'deitlab.papyri.detectors:build_retinanet',
                   'RetinaNet (anchors, focal loss) on the same ResNet-18 FPN, anchors sized for glyphs, from scratch '
                   '(torchvision, BSD)', backend='torchvision', paper='Lin et al., ICCV 2017')
for _scale, _size in (('n', 'nano'), ('s', 'small'), ('m', 'medium')):
    DETECTORS.register(f'yolov8{_scale}', 'deitlab.papyri.yolo:YoloDetector',
                       f'YOLOv8-{_scale} ({_size}) from yolov8{_scale}.yaml, no weights, through ultralytics: '
                       f"AGPL-3.0, the optional extra (pip install 'deitlab[yolo]')", backend='ultralytics', extra='yolo',
                       yaml=f'yolov8{_scale}.yaml', paper='Turnbull & Mannix, IJDAR 2024 (YOLOv8 ensembles)')
