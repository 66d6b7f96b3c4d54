"""Retrieval (re-identification) evaluation: ``deitlab eval --retrieval`` (:func:`evaluate_retrieval`)
and its metric (:func:`retrieval_metrics`).

Every image of the data's ``query`` and ``gallery`` splits (items ``(image, identity, view)``, e.g.
``glyphs-reid``) gets a feature (:func:`model_features`): a model with a ``features(x)`` method (a
DCAL wrapper: its SA and GLCA class tokens, concatenated) gives that, any other its pre-logits
feature ``forward_head(forward_features(x), pre_logits=True)``. Features are L2-normalised and
compared by cosine distance ``1 - cos``. The Market-1501 protocol: for each query the gallery is
ranked by distance (ties in gallery order), gallery images of the query's identity *and* view are
removed from its ranking (junk: the same view sees the same thing); the matches are the remaining
images of its identity. A query with no match left is not counted.

* AP of a query: the mean over its matches of the precision at each match's rank,
  ``(1/n) sum_i i / rank_i`` (matches at ranks 1 and 3 of 4 gallery images: ``(1/1 + 2/3) / 2``);
  mAP is the mean AP over the counted queries.
* CMC Rank-k: the share of counted queries whose first match is in the top k.

Both are reported in percent.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .console import progress as _progress
from .data import SPLITS, DataError, parse_spec
from .data.for_model import eval_loader, model_datasets, model_input
from .distributed import resolve_device
from .rundir import create

__all__ = ['model_features', 'cosine_distance', 'average_precision', 'retrieval_metrics', 'extract_features',
           'query_gallery_features', 'evaluate_retrieval']


def model_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Retrieval features ``(B, D)``: ``model.features(x)`` when the model's class defines it (DCAL),
    else the pre-logits feature ``forward_head(forward_features(x), pre_logits=True)``."""
    if callable(getattr(type(model), 'features', None)):
        out = model.features(x)
    elif hasattr(model, 'forward_features') and hasattr(model, 'forward_head'):
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        raise ValueError(f'{type(model).__name__} has neither features(x) nor forward_features / forward_head: no '
                         f'retrieval feature')
    return out.flatten(1)


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every query (rows) and gallery feature (columns), float32."""
    q = F.normalize(query.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1)
    return 1 - q @ g.t()


def average_precision(matches: torch.Tensor) -> float:
    """AP of one ranked list, ``matches`` (bool, best first): the mean of ``i / rank_i`` over its
    matches (rank counted from 1); 0 without a match."""
    ranks = torch.nonzero(matches.flatten()).flatten().double() + 1
    if len(ranks) == 0:
        return 0.0
    return float((torch.arange(1, len(ranks) + 1, dtype=torch.float64) / ranks).mean())


def retrieval_metrics(dist: torch.Tensor, query_ids: torch.Tensor, query_views: torch.Tensor,
                      gallery_ids: torch.Tensor, gallery_views: torch.Tensor, ranks: Sequence[int] = (1, 5)) -> dict:
    """mAP and CMC Rank-k (percent) of distances ``dist`` (queries x gallery) under the Market-1501
    protocol (see the module docstring): ``mAP``, ``rank{k}`` for each k, ``queries`` and
    ``valid_queries`` (those with a match left after the junk is removed)."""
    dist = torch.as_tensor(dist)
    q_ids, q_views = torch.as_tensor(query_ids), torch.as_tensor(query_views)
    g_ids, g_views = torch.as_tensor(gallery_ids), torch.as_tensor(gallery_views)
    if dist.shape != (len(q_ids), len(g_ids)) or len(q_views) != len(q_ids) or len(g_views) != len(g_ids):
        raise ValueError(f'distances {tuple(dist.shape)} do not fit {len(q_ids)} queries and {len(g_ids)} gallery '
                         f'images (with {len(q_views)} and {len(g_views)} views)')
    aps, first = [], []
    for i in range(len(q_ids)):
        order = torch.argsort(dist[i], stable=True)
        same_id = g_ids[order] == q_ids[i]
        keep = ~(same_id & (g_views[order] == q_views[i]))
        matches = same_id[keep]
        if not bool(matches.any()):
            continue
        aps.append(average_precision(matches))
        first.append(int(torch.nonzero(matches)[0]) + 1)
    out = dict(queries=len(q_ids), valid_queries=len(aps))
    if not aps:
        raise ValueError('no query has a match in the gallery outside its own view: mAP and CMC are undefined')
    out['mAP'] = 100 * sum(aps) / len(aps)
    for k in ranks:
        out[f'rank{k}'] = 100 * sum(r <= k for r in first) / len(first)
    return out


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device, amp: bool = False,
                     progress: Optional[bool] = None, desc: str = 'features'):
    """``(features, identities, views)`` of every item ``(image, identity, view)`` of ``loader``, in
    order, with the model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if amp and device.type == 'cuda' \
        else contextlib.nullcontext()
    feats, ids, views = [], [], []
    for x, identity, view in _progress(progress, True, iterable=loader, desc=desc, leave=False):
        with autocast:
            feats.append(model_features(model, x.to(device)).float().cpu())
        ids.append(torch.as_tensor(identity))
        views.append(torch.as_tensor(view))
    model.train(was_training)
    return torch.cat(feats), torch.cat(ids), torch.cat(views)


def _require_query_gallery(data: str) -> None:
    name, _ = parse_spec(data)
    if not {'query', 'gallery'} <= set(SPLITS[name]):
        raise DataError(f'--retrieval ranks a gallery for each query: {data} has the splits '
                        f'{", ".join(SPLITS[name])}, no query and gallery; use a re-ID spec, e.g. glyphs-reid')


def query_gallery_features(model: nn.Module, data: str, device: torch.device, batch_size: int = 256, workers: int = 0,
                           progress: Optional[bool] = None):
    """``(query, gallery)``: the :func:`extract_features` triples of ``data``'s query and gallery
    splits under ``model`` on ``device`` (bf16 autocast on CUDA)."""
    _require_query_gallery(data)
    query, gallery = model_datasets(model, data, ('query', 'gallery'))
    amp = device.type == 'cuda'
    return tuple(extract_features(model, eval_loader(split, batch_size, workers=workers), device, amp, progress, desc)
                 for split, desc in ((query, 'query'), (gallery, 'gallery')))


def evaluate_retrieval(model_spec: str, data: str, batch_size: int = 256, device: Optional[str] = None,
                       workers: int = 0, progress: Optional[bool] = None) -> dict:
    """mAP and CMC Rank-1/5 of ``model_spec`` (a name or run directory) on the ``query`` and
    ``gallery`` splits of ``data`` (see the module docstring)."""
    _require_query_gallery(data)   # before loading the model
    model = create(model_spec)
    dev = resolve_device(device)
    model.to(dev).eval()
    q, g = query_gallery_features(model, data, dev, batch_size, workers, progress)
    try:
        res = retrieval_metrics(cosine_distance(q[0], g[0]), q[1], q[2], g[1], g[2])
    except ValueError as e:
        raise DataError(f'{data}: {e}') from None
    chans, size = model_input(model)
    return dict(model=str(model_spec), data=data, gallery=len(g[0]), feature_dim=int(q[0].shape[1]),
                distance='cosine', input=[chans, size, size], **res)
