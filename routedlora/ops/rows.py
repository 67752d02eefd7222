"""Which routing row each token reads: the per-batch routing metadata every layer shares.

Built once per batch (by :func:`routedlora.routing`, or once per direct layer call) and
passed to every routed layer and its backward, so nothing here is recomputed per layer.
Two layouts:

* contiguous runs (``seq_len = S``): row ``ρ`` owns tokens ``[ρS, (ρ+1)S)``. One row per
  sequence (``S`` = sequence length) or per token (``S = 1``). ``x`` viewed as ``(R, S, d)``
  is then already grouped by row: no sort, no gather.
* explicit ``route_ids (N,)``: any token-to-row map (ragged rows), as the public op takes it.

Derived tensors (``route_ids`` of a contiguous layout, the stable token order by row and
the row offsets that the kernels use) are built on the device on first use, without a
host sync, and cached on the object.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class TokenRows:
    __slots__ = ("n_rows", "n_tokens", "seq_len", "device", "_route_ids", "_grouping")

    def __init__(self, n_rows: int, n_tokens: int, device, *, seq_len: Optional[int] = None,
                 route_ids: Optional[Tensor] = None, grouping: Optional[Tuple[Tensor, Tensor, Tensor]] = None):
        self.n_rows, self.n_tokens, self.seq_len = int(n_rows), int(n_tokens), seq_len
        self.device = torch.device(device)
        self._route_ids = route_ids
        self._grouping = grouping

    @classmethod
    def contiguous(cls, n_rows: int, seq_len: int, device) -> "TokenRows":
        """Row ``ρ`` owns tokens ``[ρ·seq_len, (ρ+1)·seq_len)``."""
        return cls(n_rows, n_rows * seq_len, device, seq_len=seq_len)

    @classmethod
    def of(cls, route_ids: Tensor, n_rows: int) -> "TokenRows":
        """Explicit routing row of each token (any order, any row sizes)."""
        return cls(n_rows, route_ids.shape[0], route_ids.device, route_ids=route_ids)

    @property
    def tokens_per_row(self) -> float:
        return self.n_tokens / self.n_rows if self.n_rows else 0.0

    @property
    def route_ids(self) -> Tensor:
        """``(N,)`` int64 row of each token."""
        if self._route_ids is None:
            rows = torch.arange(self.n_rows, device=self.device)
            self._route_ids = rows if self.seq_len == 1 else rows.repeat_interleave(self.seq_len)
        return self._route_ids

    def grouping(self, sorter=None) -> Tuple[Tensor, Tensor, Tensor]:
        """``(order, sorted rows, offsets)``: tokens in a stable order by row, their rows, and the
        ``R + 1`` row offsets into that order. Contiguous runs are already in order; other
        layouts are sorted by ``sorter(route_ids, n_rows)`` if given, else by torch's stable sort."""
        if self._grouping is None:
            rids = self.route_ids.long()
            if sorter is not None and self.seq_len is None:
                self._grouping = tuple(sorter(rids, self.n_rows))
            elif self.seq_len is not None:
                order = torch.arange(self.n_tokens, device=self.device)
                offs = torch.arange(self.n_rows + 1, device=self.device) * self.seq_len
                # a tensor of its own: torch.compile refuses one tensor passed as two op inputs
                self._grouping = (order, rids.clone(), offs)
            else:
                order = torch.argsort(rids, stable=True)
                srows = rids[order]
                offs = torch.searchsorted(srows, torch.arange(self.n_rows + 1, device=self.device))
                self._grouping = (order, srows, offs)
        return self._grouping

    def __repr__(self) -> str:
        layout = f"seq_len={self.seq_len}" if self.seq_len is not None else "route_ids"
        return f"TokenRows(n_rows={self.n_rows}, n_tokens={self.n_tokens}, {layout})"
