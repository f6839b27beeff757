"""Learning-rate schedules and the data curriculum of from-scratch pretraining, as pure functions.

    medgpt pt configs/tiny/pt_scratch.yaml --model.name_or_path TOKENIZER_DIR --output_dir out/pt

Warmup-stable-decay (WSD): a linear warmup from 0 to the peak, a long stable stretch at the peak, then a short
decay over the last `decay_fraction` of the steps down to `min_ratio` x peak. Unlike cosine, the run's length
need not be fixed in advance: a checkpoint from the stable stretch can be cooled down later, or trained further
(MiniCPM, https://arxiv.org/abs/2404.06395). The decay has the "1-sqrt" shape, 1 - sqrt(progress), which
Hägele et al. found to match or beat a cosine schedule of the same length ("Scaling Laws and Compute-Optimal
Training Beyond Fixed Training Durations", https://arxiv.org/abs/2405.18392, section 3).

Curriculum: a list of phases, each with a number of steps and a data mix {packed dir: weight}; every batch of a
phase comes from one of its dirs, drawn with probability weight / sum of weights. The LR schedule spans the
whole run, so with the default decay_fraction the decay falls into the last phase: make that the high-quality
"anneal" phase (e.g. general -> refined -> medical anneal, as MiniCPM anneals on its best data).

Steps count optimizer updates: `step` is the global step an update produces (1 = the first update), so
`lr_multiplier(step, ...)` is the multiplier used *for* that update, and the last update (step == total) runs at
exactly min_ratio x peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from medgpt.utils import MedGPTError

SCHEDULES = ("warmup_stable_decay", "cosine", "linear", "constant")


def warmup_steps(warmup: float, total: int) -> int:
    """--train.warmup as a number of steps: a fraction of the total (< 1, rounded up as the HF Trainer does)
    or a count (>= 1)."""
    if warmup < 0:
        raise MedGPTError(f"--train.warmup {warmup} is negative. Use a fraction of the steps (< 1) or a count.")
    return math.ceil(warmup * total) if warmup < 1 else int(warmup)


def decay_steps(decay_fraction: float, total: int) -> int:
    if not 0 <= decay_fraction <= 1:
        raise MedGPTError(f"--pt.decay_fraction {decay_fraction} is not between 0 and 1 (the share of the steps "
                          f"at the end of the run over which the learning rate decays).")
    return round(decay_fraction * total)


def lr_multiplier(step: int, total: int, warmup: int, decay: int, min_ratio: float,
                  kind: str = "warmup_stable_decay") -> float:
    """Multiplier of the peak learning rate for update number `step` (1..total) of a `total`-step run.

    warmup_stable_decay: step/warmup during the warmup, 1 while stable, then 1-sqrt down to min_ratio over the
    last `decay` steps. cosine / linear: after the warmup, decay to min_ratio over all the remaining steps.
    constant: 1 after the warmup. When warmup and decay overlap (a very short run), the smaller one wins.
    """
    if kind not in SCHEDULES:
        raise MedGPTError(f"--train.lr_scheduler {kind!r} is not available for from-scratch pretraining; use one "
                          f"of: {', '.join(SCHEDULES)}.")
    step = min(max(step, 0), total)
    ramp = step / warmup if warmup > 0 and step < warmup else 1.0
    if kind == "warmup_stable_decay":
        start = total - decay
        if decay <= 0 or step <= start:
            return ramp
        progress = (step - start) / decay
        return min(ramp, min_ratio + (1 - min_ratio) * (1 - math.sqrt(progress)))
    if kind == "constant" or step <= warmup or total <= warmup:
        return ramp
    progress = (step - warmup) / (total - warmup)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)  # linear


# ----------------------------------------------------------------------------- curriculum

@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    data: dict[str, float]  # packed dir -> sampling weight (> 0)


PHASE_KEYS = ("name", "steps", "data")


def parse_phases(specs: list[Any], is_packed: Callable[[str], bool] = lambda path: True) -> list[Phase]:
    """--pt.phases (a YAML list of {name, steps, data: {PACKED_DIR: weight}}) -> Phases, or a clear error.

    `is_packed` says whether a path is a packed corpus (medgpt.scratch.memmap.is_packed_dir in the stage; tests
    pass their own)."""
    how = ("Each phase is a mapping {name: general, steps: 100, data: {PACKED_DIR: weight, ...}} in the YAML "
           "list pt.phases.")
    if not isinstance(specs, list) or not specs:
        raise MedGPTError(f"--pt.phases must be a non-empty list of phases. {how}")
    phases = []
    for i, spec in enumerate(specs, 1):
        if not isinstance(spec, dict):
            raise MedGPTError(f"--pt.phases: phase {i} is {spec!r}, not a mapping. {how}")
        name = str(spec.get("name") or f"phase{i}")
        where = f"--pt.phases: phase {i} ('{name}')"
        unknown = sorted(set(spec) - set(PHASE_KEYS))
        if unknown:
            raise MedGPTError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; a phase has only "
                              f"{', '.join(PHASE_KEYS)}. {how}")
        steps = spec.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise MedGPTError(f"{where}: steps is {steps!r}; it must be a positive whole number of optimizer "
                              f"steps. {how}")
        data = spec.get("data")
        if not isinstance(data, dict) or not data:
            raise MedGPTError(f"{where}: data is {data!r}; it must map at least one packed dir to a weight. {how}")
        weights = {}
        for path, w in data.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise MedGPTError(f"{where}: the weight of {path} is {w!r}; weights must be positive numbers "
                                  f"(they are normalised within the phase). Drop the dir to leave it out.")
            if not is_packed(str(path)):
                raise MedGPTError(f"{where}: {path} is not a packed corpus (no such dir, or no meta.json in it). "
                                  f"Create it with `medgpt pack`, or fix the path (relative to the working dir).")
            weights[str(path)] = float(w)
        phases.append(Phase(name, steps, weights))
    return phases


def total_steps(phases: list[Phase]) -> int:
    return sum(p.steps for p in phases)


def phase_index(phases: list[Phase], step: int) -> int:
    """Index of the phase that update number `step` (1..total) belongs to: phase i holds the steps
    start_i+1 .. start_i+steps_i. Steps past the end stay in the last phase."""
    end = 0
    for i, p in enumerate(phases):
        end += p.steps
        if step <= end:
            return i
    return len(phases) - 1


def phase_start(phases: list[Phase], index: int) -> int:
    """The step before phase `index`'s first step (its first update is step phase_start + 1)."""
    return sum(p.steps for p in phases[:index])


def sample_source(phase: Phase, rng) -> str:
    """One packed dir of the phase, drawn with probability weight / total weight (rng: numpy Generator)."""
    dirs = list(phase.data)
    if len(dirs) == 1:
        return dirs[0]  # no draw, so a one-dir run consumes the RNG exactly like plain random windows
    total = sum(phase.data.values())
    return dirs[int(rng.choice(len(dirs), p=[phase.data[d] / total for d in dirs]))]
