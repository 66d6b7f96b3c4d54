"""The vote of the detector and the crop classifiers on each box's letter.

Turnbull & Mannix (IJDAR 2024) won the recognition task of the ICDAR 2023 papyri competition by
re-classifying every fused box with two crop classifiers, a DeiT and a SimCLR-pretrained ResNet-50,
and letting the detector and the two classifiers vote: the letter most of them name. Their paper
leaves open how a three-way disagreement is settled and what score the box keeps; here both are
rules of this module, stated exactly.

The **members** of a box's vote are the detector (member 0: its letter ``l_0`` with its box score
``s``) and each refiner ``r`` (its letter probabilities ``p_r``, letter ``l_r = argmax p_r``). Each
member has a weight ``w_m`` (default 1) and a confidence ``c_m``: ``c_0 = s``, ``c_r = max p_r``.

* ``majority`` (the paper's rule): the letter with the largest total weight of members naming it,
  ``n(k) = sum_m w_m [l_m = k]``. When several letters tie (three members naming three letters,
  or two naming two), the letter of the **most confident** member among those naming a tied letter
  wins (a tie in confidence goes to the earlier member: the detector, then the refiners in order).
* ``average`` (score averaging): the letter of largest mean probability,
  ``p_bar = (w_0 onehot(l_0) + sum_r w_r p_r) / sum_m w_m`` (the detector names one letter, so it
  votes with a one-hot vector; its score is its box's, below).

The box's **score** is recomputed from the members that agree with the chosen letter ``k*``
(``score='agree'``, the default) or kept (``'detector'``):

* majority: ``score = s * sum_{m : l_m = k*} w_m u_m / sum_m w_m`` with ``u_0 = 1`` and
  ``u_r = p_r(k*)``: the detector's score (whether the box holds a letter at all, which classifiers
  trained on letters cannot tell) scaled by the agreeing members' share of the vote, each refiner
  counted by its probability of the letter. All members agreeing with certainty keep ``s``; a letter
  named by two of three, ``2/3`` of it at most.
* average: ``score = s * p_bar(k*)``.

With no refiner, both rules return the detector's letters and scores unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .alphabet import NUM_CLASSES
from .config import PapyriError

__all__ = ['VOTE_RULES', 'SCORE_RULES', 'VoteConfig', 'VoteResult', 'vote']

VOTE_RULES = ('majority', 'average')
SCORE_RULES = ('agree', 'detector')


@dataclass(frozen=True)
class VoteConfig:
    """``rule`` (``majority`` or ``average``), ``score`` (``agree`` or ``detector``) and the members'
    ``weights`` (detector first, then the refiners in order; None: all 1)."""
    rule: str = 'majority'
    score: str = 'agree'
    weights: Optional[tuple] = None

    def validate(self, members: int) -> 'VoteConfig':
        if self.rule not in VOTE_RULES:
            raise PapyriError(f'vote must be one of {", ".join(VOTE_RULES)}, got {self.rule!r}')
        if self.score not in SCORE_RULES:
            raise PapyriError(f'vote_score must be one of {", ".join(SCORE_RULES)}, got {self.score!r}')
        if self.weights is not None:
            if len(self.weights) != members:
                raise PapyriError(f'vote_weights: {len(self.weights)} weight(s) for {members} members (the detector, '
                                  f'then each refiner)')
            if any(not np.isfinite(w) or w <= 0 for w in self.weights):
                raise PapyriError(f'vote_weights must be positive numbers, got {",".join(map(str, self.weights))}')
        return self


@dataclass
class VoteResult:
    """The vote on ``N`` boxes: the chosen ``labels`` and ``scores`` ``(N,)``, each member's letter
    ``member_labels`` and confidence ``member_conf`` ``(M, N)`` (detector first), and how many members
    name the chosen letter, ``agree`` ``(N,)``."""
    labels: np.ndarray
    scores: np.ndarray
    member_labels: np.ndarray
    member_conf: np.ndarray
    agree: np.ndarray


def vote(det_labels, det_scores, refiner_probs: Sequence = (), config: VoteConfig = VoteConfig()) -> VoteResult:
    """The vote of the module's docstring on ``N`` boxes: ``det_labels`` ``(N,)`` (0..23) and
    ``det_scores`` ``(N,)``, the detector's; ``refiner_probs``: one ``(N, 24)`` array of letter
    probabilities per refiner (rows summing to 1)."""
    labels0 = np.asarray(det_labels, dtype=np.int64).reshape(-1)
    s = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    n = len(labels0)
    probs = [np.asarray(p, dtype=np.float64).reshape(n, NUM_CLASSES) if np.size(p) == n * NUM_CLASSES
             else np.asarray(p) for p in refiner_probs]
    if len(s) != n or any(p.shape != (n, NUM_CLASSES) for p in probs):
        raise PapyriError(f'vote: {n} detector labels, {len(s)} scores and refiner probabilities of shapes '
                          f'{[p.shape for p in probs]}; expected ({n},) and ({n}, {NUM_CLASSES}) each')
    m = 1 + len(probs)
    config.validate(m)
    if n == 0:
        return VoteResult(labels0, s, np.zeros((m, 0), np.int64), np.zeros((m, 0)), np.zeros(0, np.int64))
    w = np.ones(m) if config.weights is None else np.asarray(config.weights, dtype=np.float64)
    member_labels = np.stack([labels0] + [p.argmax(1) for p in probs])
    member_conf = np.stack([s] + [p.max(1) for p in probs])
    cols = np.arange(n)
    if config.rule == 'majority':
        counts = np.zeros((n, NUM_CLASSES))
        for k in range(m):
            np.add.at(counts, (cols, member_labels[k]), w[k])
        tied = np.isclose(counts, counts.max(1, keepdims=True), rtol=0, atol=1e-9)
        eligible = tied[cols[None, :], member_labels]                  # (M, N): names a tied letter
        chooser = np.where(eligible, member_conf, -np.inf).argmax(0)   # first of the most confident
        labels = member_labels[chooser, cols]
        agreeing = member_labels == labels[None, :]
        support = np.stack([np.ones(n)] + [p[cols, labels] for p in probs])
        share = (w[:, None] * agreeing * support).sum(0) / w.sum()
    else:
        mean = np.zeros((n, NUM_CLASSES))
        mean[cols, labels0] += w[0]
        for k, p in enumerate(probs, start=1):
            mean += w[k] * p
        mean /= w.sum()
        labels = mean.argmax(1)
        agreeing = member_labels == labels[None, :]
        share = mean[cols, labels]
    scores = s * share if config.score == 'agree' else s.copy()
    return VoteResult(labels.astype(np.int64), scores, member_labels, member_conf, agreeing.sum(0).astype(np.int64))
