"""The HMM laboratory: Theorem 2 of LM-Steer checked numerically (``memsteer hmm theorem2``), and training
runs with exact counterfactual memorisation (``memsteer hmm simulate``)."""

from __future__ import annotations

import json
import os

from . import _native
from ._errors import InputError


def theorem2(
    seed: int = 1, states: int = 4, conditions: int = 2, vocab: int = 5, length: int = 5, samples: int = 20
) -> dict:
    """The report of ``memsteer hmm theorem2 --json``: switching the initial condition of a random
    Assumption-1 HMM equals a linear map of its word embeddings (``max_abs_error`` at rounding level),
    against a negative control that a least-squares map cannot reproduce."""
    try:
        return json.loads(_native.theorem2(seed, states, conditions, vocab, length, samples))
    except (OverflowError, TypeError) as e:
        raise InputError(str(e)) from e


def simulate(
    out,
    seed: int = 1,
    states: int = 4,
    vocab: int = 8,
    length: int = 24,
    batch_size: int = 16,
    steps: int = 240,
    validation: int = 400,
    lr: float = 1.0,
    validation_shift: float = 0.0,
    counterfactual: str = "substitute",
    replicates: int = 8,
) -> dict:
    """A training run of an HMM language model with every batch known, as ``memsteer hmm simulate``:
    writes ``panel.csv`` (what :func:`memsteer.profile` reads), ``truth.csv`` (the exact τ(g, c) from
    counterfactual retraining) and ``simulation.json`` into ``out``; returns ``{"panel": DataFrame,
    "truth": DataFrame, "files": [...]}``."""
    import pandas as pd

    try:
        files = _native.simulate(
            os.fspath(out), seed, states, vocab, length, batch_size, steps, validation, lr, validation_shift,
            counterfactual, replicates,
        )
    except (OverflowError, TypeError) as e:
        raise InputError(str(e)) from e
    return {
        "panel": pd.read_csv(os.path.join(os.fspath(out), "panel.csv")),
        "truth": pd.read_csv(os.path.join(os.fspath(out), "truth.csv")),
        "files": files,
    }
