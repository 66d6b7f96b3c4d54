"""Golden behaviour: models, training, NViT pruning and token fusion must reproduce
``tests/data/golden_behaviour.npz`` bit for bit (on a CPU whose vector instructions differ from the
recording one's, within the low bits: ``make_golden_behaviour.close``).

Each test recomputes one case of ``tests/data/make_golden_behaviour.py`` (imported, so the test
and the script that wrote the file run the same code) on one CPU thread with fixed seeds, and
demands every stored array back identical: same dtype, same shape, same bytes (``np.array_equal``
and more: a float must keep its exact bits). The previous thread count is restored after each
case. The module docstring of the script says what every key holds and how to regenerate the
file; regenerate it only for an intended change of behaviour. A failure lists every key that
differs, with how many values and the largest difference.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_SCRIPT = Path(__file__).resolve().parent / 'data' / 'make_golden_behaviour.py'


def _import_script():
    spec = importlib.util.spec_from_file_location('make_golden_behaviour', _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault('make_golden_behaviour', module)
    spec.loader.exec_module(module)
    return module


golden = _import_script()


@pytest.fixture(scope='module')
def stored() -> dict:
    return golden.load(golden.DEFAULT_OUT)


def _check(case: str, stored: dict, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    fresh = golden.compute_case(case, tmp_path)
    assert torch.get_num_threads() == threads, 'the case did not restore the thread count'
    expected = {k: v for k, v in stored.items() if golden.case_of(k) == case}
    assert expected, f'{case}: nothing stored for this case; regenerate the golden file'
    diff = golden.differences(fresh, expected, golden.exact_here(stored))
    assert not diff, f'{case} changed behaviour (compared {golden.comparison(stored)}):\n  ' + '\n  '.join(diff)


@pytest.mark.parametrize('name', golden.MODELS)
def test_model_family_logits_and_init(name, stored, tmp_path):
    """Pins each registered family's smallest variant built after ``torch.manual_seed(0)``: its
    initial weights (per tensor: numel, exact sum, exact sum of squares, first values), its
    eval-mode logits on two seeded images, and for distilled models both heads in distilled
    training mode."""
    _check(f'models.{name}', stored, tmp_path)


@pytest.mark.parametrize('config', list(golden.TRAIN_CONFIGS))
def test_training_run(config, stored, tmp_path):
    """Pins ``train(TrainConfig(...))`` over 2 epochs x 2 steps of batch 8 on glyphs (warm-up and
    cosine schedule, drop path, label smoothing, light augmentation, epoch reseeding) in one
    configuration: plain, Mixup/CutMix, soft distillation, hard distillation of a distilled
    student, MCTF with its consistency loss, ToMe, TransMix, MixPro, EMA with gradient clipping
    and the noise defence, or PGD adversarial training. Compared: the final weights (and EMA
    weights), and every epoch's loss, learning rate, validation accuracy and loss and mixing
    statistics."""
    _check(f'train.{config}', stored, tmp_path)


def test_nvit_pruning_run(stored, tmp_path):
    """Pins ``prune_nvit`` of a seeded DeiT-pico to 0.5 of its GMACs with the committed latency
    table in the ranking: the units removed at every event and in what order, the per-block widths
    (heads, qk, v, MLP, embedding) after every event and at the end, each event's loss and
    estimates, the final estimate and predicted speed-up, the densified weights and the weights
    after the 2 fine-tuning steps with their metrics."""
    _check('prune.nvit', stored, tmp_path)


def test_ofb_search_run(stored, tmp_path):
    """Pins ``prune_ofb`` of a seeded DeiT-pico to 0.5 of its GMACs: every module's expected width
    after every elimination event, the candidates eliminated, the shrinks, the searched widths and
    weights and the weights after the 2 fine-tuning steps with their metrics."""
    _check('prune.ofb', stored, tmp_path)


@pytest.mark.parametrize('setting', list(golden.TOKEN_SETTINGS))
def test_token_fusion_plan(setting, stored, tmp_path):
    """Pins ToMe / MCTF / MCTF-Fast (and MCTF's modes and poolings) on DeiT-nano, distilled
    DeiT-pico and SpectFormer-pico: the logits on two seeded images, the tokens entering every
    block, the clamped schedule, the final token sizes, which final token holds every input patch,
    and the closed-form GMACs."""
    _check(f'tokens.{setting}', stored, tmp_path)


def test_token_schedule_and_merge_functions(stored, tmp_path):
    """Pins the pure token machinery: ``token_schedule`` for every form of r (constant,
    (r, inflect), fraction, list, MCTF's clamps, two protected tokens), and ``bipartite_plan``'s
    slots and ``merge_weighted``'s output for ToMe's one pass and MCTF's bidirectional matching on
    seeded tokens."""
    _check('tokens.functions', stored, tmp_path)


def test_golden_file_holds_exactly_the_cases(stored):
    """Every stored key belongs to a case the tests run (no stale results), every case has stored
    results, and the file records the library versions it was made with."""
    keys = [k for k in stored if not k.startswith('meta.')]
    assert [k for k in keys if not golden.case_of(k)] == []
    assert sorted(set(map(golden.case_of, keys))) == sorted(golden.CASES)
    assert 'torch' in str(stored['meta.versions']) and str(stored['meta.cpu_capability'])
    assert all(isinstance(v, np.ndarray) for v in stored.values())


def test_close_tolerates_low_bits_only():
    """Another CPU's low bits pass ``close``; a real change, a moved NaN, another dtype or an
    integer off by one do not."""
    b = np.array([1.0, -2.0, 0.5, np.nan], dtype=np.float32)
    assert golden.close(b + np.float32(1e-6) * np.array([1, 1, -1, 0], dtype=np.float32), b)
    assert not golden.same(b + np.float32(1e-6), b)
    assert not golden.close(b + np.float32(1e-3) * np.array([1, 0, 0, 0], dtype=np.float32), b)
    assert not golden.close(np.array([1.0, -2.0, np.nan, 0.5], dtype=np.float32), b)
    assert not golden.close(b.astype(np.float64), b)
    assert not golden.close(np.array([1, 2, 4]), np.array([1, 2, 3]))
    assert golden.close(np.array([1.6e-7]), np.array([1.5e-7]))   # a difference of tiny values: the 1e-3 floor
