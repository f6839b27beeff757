"""WSD schedule shape (exact values), the other schedules' ends, curriculum phases and their sampler, bad specs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgpt.scratch.schedule import (
    Phase,
    decay_steps,
    lr_multiplier,
    parse_phases,
    phase_index,
    phase_start,
    sample_source,
    total_steps,
    warmup_steps,
)
from medgpt.utils import MedGPTError


def wsd(step, total=100, warmup=10, decay=20, min_ratio=0.1):
    return lr_multiplier(step, total, warmup, decay, min_ratio, "warmup_stable_decay")


def test_wsd_exact_values():
    assert wsd(0) == 0.0
    assert wsd(1) == pytest.approx(0.1) and wsd(5) == pytest.approx(0.5)
    assert wsd(10) == 1.0                                    # peak reached at the end of the warmup
    assert wsd(11) == wsd(50) == wsd(80) == 1.0              # stable until the decay starts (steps 81..100)
    assert wsd(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))  # 1-sqrt decay: 0.55
    assert wsd(100) == pytest.approx(0.1)                    # the last update runs at min_ratio x peak
    assert wsd(150) == pytest.approx(0.1)                    # past the end: clamped


def test_wsd_shape_monotone_pieces():
    lrs = [wsd(s) for s in range(101)]
    warm, stable, decay = lrs[:11], lrs[10:81], lrs[80:]
    assert all(b - a == pytest.approx(0.1) for a, b in zip(warm, warm[1:]))  # linear 0 -> peak
    assert set(stable) == {1.0}
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly decreasing to the end
    assert min(lrs[1:]) == pytest.approx(0.1)


def test_wsd_edges():
    assert lr_multiplier(1, 10, 0, 0, 0.1) == 1.0                    # no warmup, no decay: constant peak
    assert lr_multiplier(10, 10, 0, 10, 0.0) == 0.0                  # decay over everything, down to 0
    # a run shorter than warmup + decay: the smaller of the two wins
    short = [lr_multiplier(s, 4, 3, 2, 0.0) for s in range(1, 5)]
    assert short == pytest.approx([1 / 3, 2 / 3, 1 - math.sqrt(0.5), 0.0])


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_cosine_and_linear_end_at_min(kind):
    lrs = [lr_multiplier(s, 50, 5, 0, 0.2, kind) for s in range(51)]
    assert lrs[5] == 1.0 and lrs[50] == pytest.approx(0.2)
    assert all(b <= a for a, b in zip(lrs[5:], lrs[6:]))
    assert lr_multiplier(30, 50, 5, 0, 0.0, "constant") == 1.0


def test_warmup_and_decay_steps():
    assert warmup_steps(0.03, 100) == 3 and warmup_steps(0.031, 100) == 4 and warmup_steps(25, 100) == 25
    assert warmup_steps(0, 100) == 0
    assert decay_steps(0.2, 100) == 20 and decay_steps(0.0, 100) == 0
    with pytest.raises(MedGPTError, match="between 0 and 1"):
        decay_steps(1.5, 100)
    with pytest.raises(MedGPTError, match="lr_scheduler 'polynomial'"):
        lr_multiplier(1, 10, 0, 0, 0.1, "polynomial")


# ----------------------------------------------------------------------------- curriculum

SPECS = [{"name": "general", "steps": 30, "data": {"gen": 3, "web": 1}},
         {"name": "refined", "steps": 10, "data": {"book": 1}},
         {"name": "anneal", "steps": 5, "data": {"med": 0.7, "book": 0.3}}]


def test_phase_switching_and_total():
    phases = parse_phases(SPECS)
    assert [p.name for p in phases] == ["general", "refined", "anneal"] and total_steps(phases) == 45
    which = [phase_index(phases, s) for s in range(1, 46)]
    assert which == [0] * 30 + [1] * 10 + [2] * 5          # steps 1-30, 31-40, 41-45
    assert [phase_start(phases, i) for i in range(3)] == [0, 30, 40]
    assert phase_index(phases, 99) == 2


def test_sampler_respects_weights_and_seed():
    phase = parse_phases(SPECS)[0]
    rng = np.random.default_rng(42)
    picks = [sample_source(phase, rng) for _ in range(20_000)]
    share = picks.count("gen") / len(picks)
    assert share == pytest.approx(0.75, abs=0.015)
    again = np.random.default_rng(42)
    assert [sample_source(phase, again) for _ in range(100)] == picks[:100]  # same seed, same draws
    one = Phase("x", 1, {"only": 1.0})
    rng, ref = np.random.default_rng(1), np.random.default_rng(1)
    assert sample_source(one, rng) == "only" and rng.random() == ref.random()  # one dir consumes no randomness


def test_phase_names_default_and_paths_checked():
    phases = parse_phases([{"steps": 2, "data": {"a": 1}}], is_packed=lambda p: p == "a")
    assert phases == [Phase("phase1", 2, {"a": 1.0})]


@pytest.mark.parametrize("specs, needle", [
    ([], "non-empty list"),
    ("general", "non-empty list"),
    (["general"], "not a mapping"),
    ([{"name": "g", "steps": 0, "data": {"a": 1}}], "positive whole number"),
    ([{"name": "g", "steps": -3, "data": {"a": 1}}], "positive whole number"),
    ([{"name": "g", "steps": 2.5, "data": {"a": 1}}], "positive whole number"),
    ([{"name": "g", "data": {"a": 1}}], "steps is None"),
    ([{"name": "g", "steps": 2, "data": {}}], "at least one packed dir"),
    ([{"name": "g", "steps": 2, "data": ["a"]}], "at least one packed dir"),
    ([{"name": "g", "steps": 2, "data": {"a": 0}}], "weights must be positive"),
    ([{"name": "g", "steps": 2, "data": {"a": -1}}], "weights must be positive"),
    ([{"name": "g", "steps": 2, "data": {"a": "lots"}}], "weights must be positive"),
    ([{"name": "g", "step": 2, "data": {"a": 1}}], "unknown key(s) step"),
    ([{"name": "g", "steps": 2, "data": {"missing/dir": 1}}], "missing/dir is not a packed corpus"),
])
def test_bad_phase_specs_refused(specs, needle):
    with pytest.raises(MedGPTError) as e:
        parse_phases(specs, is_packed=lambda p: p == "a")
    assert needle in str(e.value)
