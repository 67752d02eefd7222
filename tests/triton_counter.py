"""Counts what Triton kernels do in the interpreter: bytes each tensor argument serves, and dot FLOPs.

Inside :func:`counting`, every kernel launched in Triton's interpreter (``TRITON_INTERPRET=1``)
is recorded: its name, its grid, and per tensor argument the bytes requested by masked loads
and stores (active lanes × element size) and the distinct bytes touched; plus the FLOPs of
its ``tl.dot`` calls (2·M·N·K each, at the tile's shape). The launchers' traffic formulas in
:mod:`routedlora.ops.triton_backend` are checked against these counts.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Set

import numpy as np


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: Dict[str, tuple] = field(default_factory=dict)  # "NAME" or "A|B" (one storage) -> (lo, hi)
    loaded: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stored: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    touched: Dict[str, Set[int]] = field(default_factory=lambda: defaultdict(set))
    flops: int = 0

    def requested(self, name: str) -> int:
        return self.loaded.get(name, 0) + self.stored.get(name, 0)

    def distinct(self, name: str) -> int:
        return len(self.touched.get(name, ()))


@contextlib.contextmanager
def counting():
    """Yields a list that fills with one :class:`Launch` per kernel launch."""
    from triton.runtime import interpreter as interp

    launches: List[Launch] = []
    current: List[Launch] = []
    executor_call = interp.GridExecutor.__call__
    builder = interp.InterpreterBuilder
    load, store, dot = builder.create_masked_load, builder.create_masked_store, builder.create_dot

    def call(self, *args, **kwargs):
        launch = Launch(self.fn.__name__, ())
        ranges: Dict[tuple, List[str]] = {}
        for name, arg in zip(self.arg_names, args):
            if hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                ranges.setdefault((storage.data_ptr(), storage.data_ptr() + storage.nbytes()), []).append(name)
        # arguments passed the same storage (a placeholder, or base = y) are counted together
        launch.args = {"|".join(names): rng for rng, names in ranges.items()}
        grid = self.grid
        launch.grid = tuple(grid) if not callable(grid) else grid
        launches.append(launch)
        current.append(launch)
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            current.pop()

    def account(ptrs, mask, table):
        launch = current[-1]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addrs = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
        for name, (lo, hi) in launch.args.items():
            hit = addrs[(addrs >= lo) & (addrs < hi)]
            if hit.size:
                table[name] += int(hit.size) * size
                for a in np.unique(hit):
                    launch.touched[name].update(range(int(a), int(a) + size))

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        account(ptrs, mask, current[-1].loaded)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        account(ptrs, mask, current[-1].stored)
        return store(self, ptrs, value, mask, cache_policy)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        (M, K), N = a.data.shape[-2:], b.data.shape[-1]
        current[-1].flops += 2 * M * N * K
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store, builder.create_dot = masked_load, masked_store, create_dot
    try:
        yield launches
    finally:
        interp.GridExecutor.__call__ = executor_call
        builder.create_masked_load, builder.create_masked_store, builder.create_dot = load, store, dot
