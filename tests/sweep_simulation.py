"""Seeded simulated sweeps with known truth, to test a selection rule against it.

A sweep here is what ``tune`` measures: a base, a fine-tune and K variants, each with a
0/1 outcome per prompt and a summed loss per text window. The truth is set, so the test
can ask how often a rule picks a variant whose *true* retention is below the bound.

Prompts: the fine-tune answers each right with probability ``accuracy_finetuned``;
variant k answers differently from the fine-tune on a share ``discordance[k]`` of the
prompts, its gains and losses balanced so that its true accuracy is
``retention[k] * accuracy_finetuned`` (outcomes correlated with the fine-tune's, as a
pruned copy of it answers). Windows: a mean token loss per window shared by all models
(some passages are harder), the fine-tune ``forgetting`` above the base, variant k
``repair[k]`` of that forgetting below the fine-tune, plus independent noise per model
and window. Generation is vectorised over runs; a rule sees one :class:`Sweep` at a time.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Truth:
    """What a simulated sweep is drawn from (defaults: a LoRA-like sweep of 8 strengths,
    accuracy falling and repair rising with strength).

    Attributes:
        accuracy_finetuned (`float`): the fine-tune's true accuracy.
        retention (`tuple`): each variant's true accuracy over the fine-tune's.
        discordance (`tuple`): each variant's true share of prompts answered differently
            from the fine-tune (at least ``|accuracy difference|``).
        repair (`tuple`): each variant's true share of the forgetting undone (loss units).
        prompts, windows, tokens (`int`): prompts; text windows; tokens per window.
        forgetting (`float`): the fine-tune's true mean token loss above the base.
        window_sd (`float`): spread of the mean token loss between windows (all models).
        noise_sd (`float`): each model's own noise in a window's mean token loss.
    """

    accuracy_finetuned: float = 0.8
    retention: Tuple[float, ...] = (1.0, 0.999, 0.997, 0.995, 0.992, 0.985, 0.98, 0.97)
    discordance: Tuple[float, ...] = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08)
    repair: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    prompts: int = 1000
    windows: int = 24
    tokens: int = 256
    forgetting: float = 0.05
    window_sd: float = 0.3
    noise_sd: float = 0.01

    def __post_init__(self):
        difference = (np.asarray(self.retention) - 1) * self.accuracy_finetuned
        if not (np.abs(difference) <= np.asarray(self.discordance)).all():
            raise ValueError("each variant's discordance must cover its accuracy difference")
        if not len(self.retention) == len(self.discordance) == len(self.repair):
            raise ValueError("retention, discordance and repair need one value per variant")


@dataclass(frozen=True)
class Sweep:
    """One simulated sweep, as a rule sees it.

    Attributes:
        finetuned_correct (`np.ndarray`): (prompts,) 0/1.
        variant_correct (`np.ndarray`): (K, prompts) 0/1.
        base_losses, finetuned_losses (`np.ndarray`): (windows,) summed token losses.
        variant_losses (`np.ndarray`): (K, windows).
        tokens (`np.ndarray`): (windows,) tokens per window.
    """

    finetuned_correct: np.ndarray
    variant_correct: np.ndarray
    base_losses: np.ndarray
    finetuned_losses: np.ndarray
    variant_losses: np.ndarray
    tokens: np.ndarray


def simulate(truth: Truth, runs: int, seed: int) -> Iterator[Sweep]:
    """``runs`` independent sweeps drawn from ``truth`` (same seed, same sweeps)."""
    rng = np.random.default_rng(seed)
    k, n, w = len(truth.retention), truth.prompts, truth.windows
    acc = truth.accuracy_finetuned
    difference = (np.asarray(truth.retention) - 1) * acc
    rate = np.asarray(truth.discordance)
    # P(variant right and fine-tune wrong) = (rate + difference) / 2, and the reverse
    flip_up = ((rate + difference) / 2 / (1 - acc))[None, :, None]
    flip_down = ((rate - difference) / 2 / acc)[None, :, None]
    finetuned = rng.random((runs, n)) < acc
    draw = rng.random((runs, k, n))
    variants = np.where(finetuned[:, None, :], draw >= flip_down, draw < flip_up)

    tokens = np.full(w, float(truth.tokens))
    shared = 2.0 + truth.window_sd * rng.standard_normal((runs, w))
    noise = truth.noise_sd * rng.standard_normal((runs, k + 2, w))
    base = shared + noise[:, 0]
    finetuned_loss = shared + truth.forgetting + noise[:, 1]
    remaining = truth.forgetting * (1 - np.asarray(truth.repair))
    variant_loss = shared[:, None, :] + remaining[None, :, None] + noise[:, 2:]
    for r in range(runs):
        yield Sweep(finetuned[r].astype(int), variants[r].astype(int), base[r] * tokens,
                    finetuned_loss[r] * tokens, variant_loss[r] * tokens, tokens)


def evaluate(select: Callable[[Sweep], Optional[int]], truth: Truth, runs: int = 200,
             seed: int = 0) -> np.ndarray:
    """The variant ``select`` picks in each of ``runs`` sweeps; -1 where it picks none."""
    return np.array([(-1 if (pick := select(sweep)) is None else pick)
                     for sweep in simulate(truth, runs, seed)])


def wrong_pick_rate(chosen: np.ndarray, truth: Truth, min_retention: float) -> float:
    """Share of runs whose pick truly keeps less than ``min_retention`` (no pick is not
    a wrong pick)."""
    retention = np.asarray(truth.retention + (np.inf,))  # index -1: no pick
    return float((retention[chosen] < min_retention).mean())
