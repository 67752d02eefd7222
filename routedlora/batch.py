"""Per-batch routing metadata, built once and shared by every routed layer of a model.

:func:`routedlora.routing` checks the task ids once and keeps a :class:`RoutingState`;
each layer asks it for the :class:`BatchRows` of its input's leading shape, which is
built on first use and cached (an encoder and a decoder of different lengths get one
entry each). Nothing here syncs with the host unless ``validate`` must read ids that
live on an accelerator.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .ops.rows import TokenRows
from .validation import check_tensor, values_checkable


class BatchRows(NamedTuple):
    """Routing rows of one batch: which task each row routes by, and which tokens read it.

    One row per sequence (task ids ``(B,)`` or a scalar), or one per token (ids of the
    input's leading shape). Gumbel noise is drawn per example: ``row_example`` maps a row to
    its sequence (``None`` when row ``ρ`` is sequence ``ρ``).
    """

    rows_task: Tensor
    row_example: Optional[Tensor]
    n_examples: int
    tokens: TokenRows
    task_rows: Dict[int, TokenRows]  # the rows grouped by task, per task count (see by_task)
    # each layer's routing weights where they cannot change while the batch lives (inference: no
    # noise, no gradient), so that the steps of a generate loop route once: the decode steps share
    # one batch, and when rows are sequences the prefill's batch shares this dict with them
    # (same rows): layer (or shared table) id -> (what they were computed from, (idx, w))
    routed: Dict[int, tuple]
    # None when the task ids' range was checked; else (validate=False, or traced) what the
    # routers read instead, so that an out-of-range id never wraps around or reads another task
    unchecked: Optional["UncheckedRows"] = None

    def by_task(self, n_tasks: int) -> TokenRows:
        """The routing rows as the "tokens" of ``n_tasks`` task rows: their grouping by task is
        what sums the routing logits' gradients per task (built once per batch, on first use)."""
        rows = self.task_rows.get(n_tasks)
        if rows is None:
            rows = self.task_rows[n_tasks] = TokenRows.of(self.rows_task, n_tasks)
        return rows


def as_task_ids(task_ids, n_tasks: int, device, validate: bool = True) -> Tensor:
    """Task ids as a long tensor on ``device``, checked against ``[0, n_tasks)``.

    The range check reads values: free for CPU tensors, one host sync for ids on an
    accelerator (pass ``validate=False`` under CUDA graphs), skipped while
    ``torch.compile`` traces (where it would break the graph).
    """
    if isinstance(task_ids, bool):
        raise TypeError("task_ids: expected ints or an integer tensor, got bool")
    if isinstance(task_ids, Tensor):
        ids = task_ids
    else:
        try:
            ids = torch.as_tensor(task_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"task_ids: expected an int, a sequence of ints or an integer tensor, got "
                            f"{type(task_ids).__name__} {task_ids!r:.60}") from e
    check_tensor("task_ids", ids, integer=True)
    if ids.device.type == "meta":
        raise ValueError("task_ids: on the meta device; pass task ids with values (CPU or the model's device)")
    compiling = torch.compiler.is_compiling()
    if validate and ids.numel() and not compiling:
        host = ids if values_checkable(ids) else ids.detach().cpu()
        lo, hi = int(host.min()), int(host.max())
        if lo < 0:
            raise ValueError(f"task_ids: task ids must be >= 0, got {lo}")
        if hi >= n_tasks:
            raise ValueError(f"task_ids: task id {hi} out of range: the model has {n_tasks} tasks")
    return ids.to(device=device, dtype=torch.long)


def batch_rows(ids: Tensor, lead: Tuple[int, ...], expand: int = 1, unchecked: Optional[int] = None,
               routed_pool: Optional[dict] = None) -> BatchRows:
    """The routing rows of an input of leading shape ``lead`` (``x.shape[:-1]``) under task ids ``ids``.

    ``expand``: inside ``generate()`` each id stands for ``expand`` consecutive sequences
    (beams, returned sequences); ids of ``B / expand`` sequences are repeated for them.
    ``unchecked``: the number of tasks, where the ids' range was not checked (see :class:`UncheckedRows`).
    ``routed_pool``: kept routing weights shared by the batches of one routing block whose rows
    are its sequences, per number of rows: a prefill (B, S) and its decode steps (B, 1) route
    the same rows, so the decode steps reuse the prefill's weights (see ``BatchRows.routed``).
    """
    N = math.prod(lead)
    B = lead[0] if lead else 1
    S = N // B if B else 0
    dev = ids.device
    if ids.dim() >= 1 and expand > 1 and ids.shape[0] * expand == B:
        ids = ids.repeat_interleave(expand, dim=0)
    if ids.dim() == 0:
        ids = ids.expand(B)
    if ids.shape == lead[:1] or (not lead and ids.numel() == 1):
        rows_task = ids.reshape(-1)
        R = rows_task.shape[0]
        routed = {} if routed_pool is None else routed_pool.setdefault(R, {})
        return BatchRows(rows_task, None, R, TokenRows.contiguous(R, max(S, 1), dev), {}, routed,
                         None if unchecked is None else UncheckedRows(rows_task, unchecked))
    if ids.shape == lead:
        row_example = torch.arange(B, device=dev)
        if S != 1:
            row_example = row_example.repeat_interleave(S)
        rows_task = ids.reshape(-1)
        return BatchRows(rows_task, row_example, B, TokenRows.contiguous(N, 1, dev), {}, {},
                         None if unchecked is None else UncheckedRows(rows_task, unchecked))
    raise ValueError(f"task_ids: expected a scalar, shape ({B},) (one per sequence) or {tuple(lead)} (one per "
                     f"token) for input of shape {(*lead, '...')}, got shape {tuple(ids.shape)}")


class UncheckedRows:
    """Routing rows whose task ids nobody range-checked (``validate=False``, or traced by
    ``torch.compile``), made safe once per batch: the routers read :meth:`rows` (out-of-range
    ids clamped into the table) and add :meth:`poison` to their weights (NaN on those rows), so
    exactly the tokens of an out-of-range id come out NaN, as the routing kernels do."""

    def __init__(self, rows_task: Tensor, n_tasks: int):
        self.rows_task, self.n_tasks = rows_task, n_tasks
        self._made = None

    def _make(self):
        if self._made is None:
            ids = self.rows_task
            ok = (ids >= 0) & (ids < self.n_tasks)
            poison = torch.where(ok, 0.0, math.nan).view(-1, 1, 1)
            self._made = (ids.clamp(0, self.n_tasks - 1), poison)
        return self._made

    def rows(self) -> Tensor:
        return self._make()[0]

    def poison(self) -> Tensor:
        """``(R, 1, 1)`` float32: 0 on rows with a valid task id, NaN on the others."""
        return self._make()[1]


class RoutingState:
    """Task ids of the batch in flight, shared by every routed layer of a model."""

    def __init__(self, task_ids: Tensor, decoding: bool = False, unchecked: Optional[int] = None):
        self.task_ids = task_ids
        self.unchecked = unchecked  # the number of tasks where the ids' range was not checked
        self.expand = 1  # sequences per task id inside generate() (beams, samples)
        self.decoding = decoding  # one-position inputs continue a KV cache (set inside generate())
        self.cache = {}  # per-layer values computed at prefill and reused while decoding
        # (start, total): this process holds rows [start, start + B) of a global batch of
        # `total` sequences; Gumbel noise is drawn for all `total` and sliced (data parallel).
        self.noise_rows: Optional[Tuple[int, int]] = None
        self._rows: Dict[tuple, BatchRows] = {}
        self._seq_routed: Dict[int, dict] = {}  # expand -> routing weights kept per number of sequence rows

    def rows_for(self, lead: Tuple[int, ...]) -> BatchRows:
        """The batch's routing rows for inputs of leading shape ``lead``, built once and reused."""
        if torch.compiler.is_compiling():
            # traced once into the graph, where identical metadata ops of other layers are CSE'd
            return batch_rows(self.task_ids, lead, self.expand, self.unchecked)
        key = (lead, self.expand)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = batch_rows(self.task_ids, lead, self.expand, self.unchecked,
                                                routed_pool=self._seq_routed.setdefault(self.expand, {}))
        return rows

    def clear(self) -> None:
        self.cache.clear()
        self._rows.clear()
        self._seq_routed.clear()
