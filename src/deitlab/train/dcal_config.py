"""The settings of ``deitlab train --dcal`` (DCAL on the training loop, ``train/dcal_train.py``), its
re-ID loss and the P x K identity sampler: a base of :class:`~deitlab.train.config.TrainConfig`
(one field per flag, in the ``dcal`` section of ``--help``; ``--pk`` in ``data``, ``--triplet`` in
``re-identification``: it applies to plain training too, :mod:`deitlab.train.triplet`). Torch-free, as
the rest of the configuration.

The choices are the wrapper's (``train/dcal.py`` checks them again when it is built).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from ..registry import MIX_MODES

__all__ = ['DCALSettings', 'DCAL_RESUME_KEYS', 'parse_pk']

PWCA_KV = ('sa', 'pwca')
INFERENCE = ('sa+glca', 'sa')
HEAD_FUSIONS = ('mean', 'max')
GLCA_INITS = ('fresh', 'copy')


def _error(message: str):
    from .config import ConfigError   # config imports this module
    return ConfigError(message)


@dataclass
class DCALSettings:
    """DCAL's options of ``deitlab train`` (see :mod:`deitlab.train.dcal` for what each one does)."""
    dcal: bool = field(default=False, metadata=dict(
        group='dcal', help='train the model wrapped in DCAL (Zhu et al., CVPR 2022): self-attention, global-local '
                           'and pair-wise cross-attention branches, an uncertainty-weighted sum of their losses; '
                           'evaluation and the saved model use the DCAL inference output (deitlab.train.dcal)'))
    dcal_ratio: float = field(default=0.1, metadata=dict(
        group='dcal', help='GLCA queries: this fraction of the patch tokens, the top ones of the attention rollout '
                           '(the paper: 0.1 fine-grained, 0.3 re-ID), in (0, 1]'))
    dcal_no_glca: bool = field(default=False, metadata=dict(
        group='dcal', help='leave out the global-local cross-attention branch (needs --dcal-inference sa)'))
    dcal_no_pwca: bool = field(default=False, metadata=dict(
        group='dcal', help='leave out the pair-wise cross-attention branch'))
    dcal_pwca_kv: str = field(default='sa', metadata=dict(
        group='dcal', help="PWCA: the partner image's keys/values from its SA-branch state (sa) or its PWCA-branch "
                           "state (pwca)"))
    dcal_pwca_detach: bool = field(default=False, metadata=dict(
        group='dcal', help="PWCA: no gradient through the partner image's keys/values"))
    dcal_inference: str = field(default='sa+glca', metadata=dict(
        group='dcal', help='the output of evaluation and of the saved model: softmax(SA) + softmax(GLCA) (sa+glca) or '
                           'the SA logits alone (sa)'))
    dcal_head_fusion: str = field(default='mean', metadata=dict(
        group='dcal', help="the rollout's fusion of a block's heads: mean | max"))
    dcal_start_layer: int = field(default=0, metadata=dict(
        group='dcal', help='the first block of the rollout, counted from 0'))
    dcal_glca_init: str = field(default='fresh', metadata=dict(
        group='dcal', help="the GLCA block's start: fresh (timm's ViT init) or copy (the last block's weights)"))
    triplet: bool = field(default=False, metadata=dict(
        group='re-identification', help="add the batch-hard triplet loss (deitlab.train.triplet) on the model's "
                                        "features (with --dcal: on each branch's features) to the label loss; "
                                        "use with --pk P,K"))
    triplet_margin: float = field(default=0.3, metadata=dict(
        group='re-identification', help='margin of the batch-hard triplet loss (--triplet)'))
    pk: Optional[str] = field(default=None, metadata=dict(
        group='data', help='P,K: every training batch holds P labels (identities) x K images of each, drawn per '
                           '(seed, epoch); --batch-size must be P x K. Any labelled data'))

    def dcal_options(self) -> dict:
        """The keyword arguments of :class:`deitlab.train.dcal.DCAL` these settings give."""
        return dict(ratio=self.dcal_ratio, glca=not self.dcal_no_glca, pwca=not self.dcal_no_pwca,
                    pwca_kv=self.dcal_pwca_kv, pwca_detach=self.dcal_pwca_detach, inference=self.dcal_inference,
                    head_fusion=self.dcal_head_fusion, start_layer=self.dcal_start_layer,
                    glca_init=self.dcal_glca_init)

    def pk_shape(self) -> Optional[Tuple[int, int]]:
        """``(P, K)`` of ``--pk``, or None."""
        return None if self.pk is None else parse_pk(self.pk)

    def _check_dcal(self) -> None:
        """The DCAL settings, each alone and with the rest of the run (``ConfigError``)."""
        if isinstance(self.dcal_ratio, bool) or not 0 < self.dcal_ratio <= 1:
            raise _error(f'dcal_ratio (--dcal-ratio) is a fraction of the patch tokens in (0, 1], got {self.dcal_ratio}')
        if self.triplet_margin < 0:
            raise _error(f'triplet_margin must be >= 0, got {self.triplet_margin}')
        if self.dcal_start_layer < 0:
            raise _error(f'dcal_start_layer must be >= 0, got {self.dcal_start_layer}')
        for name, choices in (('dcal_pwca_kv', PWCA_KV), ('dcal_inference', INFERENCE),
                              ('dcal_head_fusion', HEAD_FUSIONS), ('dcal_glca_init', GLCA_INITS)):
            if getattr(self, name) not in choices:
                raise _error(f'{name} must be one of {", ".join(choices)}; got {getattr(self, name)!r}')
        if self.pk is not None:
            p, k = parse_pk(self.pk)
            if p * k != self.batch_size:
                raise _error(f'--pk {self.pk} makes batches of {p} x {k} = {p * k} images but --batch-size is '
                             f'{self.batch_size}; make them agree')
            if self.triplet and (p < 2 or k < 2):
                raise _error(f'--pk {self.pk}: the batch-hard triplet loss needs at least 2 identities (P) of at '
                             f'least 2 images (K) each')
        if self.triplet and self.distill != 'none':
            raise _error(f'--triplet does not compose with --distill {self.distill} yet (the triplet loss needs the '
                         f'features of the one head); train with --distill none')
        if self.triplet and (self.mixing_active or MIX_MODES.get(self.mix, ValueError)['attention']):
            raise _error(f'--triplet with batch mixing (--mix {self.mix}): a mixed image has no one identity to be '
                         f'near or far from; add --mix none')
        if not self.dcal:
            given = [f.name for f in fields(DCALSettings)
                     if f.name.startswith('dcal_') and getattr(self, f.name) != f.default]
            if given:
                raise _error(f'--{given[0].replace("_", "-")} is an option of DCAL training: add --dcal')
            return
        if self.dcal_no_glca and self.dcal_no_pwca:
            raise _error('--dcal-no-glca and --dcal-no-pwca leave only the backbone: keep one of the cross-attention '
                         'branches (or train without --dcal)')
        if self.dcal_no_glca and self.dcal_inference == 'sa+glca':
            raise _error('--dcal-no-glca: the inference sa+glca needs the GLCA branch; add --dcal-inference sa')
        if self.distill != 'none':
            raise _error(f'--dcal does not compose with --distill {self.distill} yet (the branches would each need '
                         f'their distillation term); train with --distill none')
        if self.mixing_active or MIX_MODES.get(self.mix, ValueError)['attention']:
            raise _error(f'--dcal with batch mixing (--mix {self.mix}) is not supported: DCAL weighs one label loss '
                         f'per branch (and PWCA pairs images itself); add --mix none')
        if self.token_fusion != 'none' or self.multilevel is not None:
            flag = '--token-fusion' if self.token_fusion != 'none' else '--multilevel'
            raise _error(f'--dcal does not compose with {flag}: DCAL runs the blocks of the model as built')


def parse_pk(spec) -> Tuple[int, int]:
    """``'P,K'`` as two ints >= 1 (``ConfigError`` otherwise)."""
    parts = [s.strip() for s in str(spec).split(',')]
    try:
        p, k = (int(s) for s in parts)
    except ValueError:
        raise _error(f'--pk takes P,K: identities per batch and images of each, e.g. 4,8; got {spec!r}') from None
    if p < 1 or k < 1:
        raise _error(f'--pk {spec}: P and K must be >= 1')
    return p, k


#: the settings a resumed run must share with the run it continues (they shape the model, the loss, the batches)
DCAL_RESUME_KEYS = tuple(f.name for f in fields(DCALSettings))
