"""The HMM laboratory: Theorem 2 of LM-Steer checked numerically (as ``memsteer hmm theorem2``)."""

from __future__ import annotations

import json

from . import _native


def theorem2(
    seed: int = 1, states: int = 4, conditions: int = 2, vocab: int = 5, length: int = 5, samples: int = 20
) -> dict:
    """The report of ``memsteer hmm theorem2 --json``: switching the initial condition of a random
    Assumption-1 HMM equals a linear map of its word embeddings (``max_abs_error`` at rounding level),
    against a negative control that a least-squares map cannot reproduce."""
    return json.loads(_native.theorem2(seed, states, conditions, vocab, length, samples))
