"""The ``torch`` backend: plain torch ops with hand-written backwards, on any device.

Two algorithms with the same contract (see :mod:`routedlora.ops.rank_space`):
:mod:`~routedlora.ops.row_mixed` (one mixed adapter per routing row, then batched GEMMs:
plain-LoRA flops per token) and :mod:`~routedlora.ops.rank_space` (every skill on every
token, mixed in rank space: no per-row adapter). :func:`plan` picks one per call from the
shape with :func:`routedlora.ops.plan.choose`.
"""
from __future__ import annotations

from . import rank_space, row_mixed
from .plan import choose

ALGORITHMS = {"row_mixed": row_mixed, "rank_space": rank_space}


def plan(x, A, B, idx, rows, combine, backward=True):
    """The algorithm module that computes this call (``backward``: gradients will be wanted)."""
    return ALGORITHMS[choose(x, A, B, idx, rows, combine, backward)]
