"""Which torch-backend algorithm computes a call: a roofline estimate from exact op counts.

DESIGN.md §2: there are two ways to compute a routed delta and neither wins everywhere.
*Row-mixed* (:mod:`~routedlora.ops.row_mixed`) pays ``R·m·r·(d+o)`` flops to mix one
adapter per routing row and moves the ``R·r'·(d+o)`` numbers of those adapters, then costs
plain LoRA per token; *rank space* (:mod:`~routedlora.ops.rank_space`) builds nothing per row
but applies all m skills to every token and moves ``h·N·m·r``-sized intermediates. Which is
cheaper depends on the tokens per row ``S = N / R`` against the rank, the skills and the
widths, and on the machine's balance of flops to bytes.

:func:`op_counts` lists, for each algorithm, the flops and the bytes read and written of
every op it runs (forward, and backward when gradients are wanted), as the code in those
modules runs them. :func:`estimate` prices a list with a roofline,
``Σ_ops max(flops / peak, read / read_bw + written / write_bw) + ops × launch`` on a
:class:`DeviceModel`,
and :func:`choose` takes the cheaper algorithm. Row-mixed needs contiguous rows of equal
length (``TokenRows.seq_len``); other layouts always take rank space.

The device models are stated, not measured at run time: ``cuda`` is an H100 SXM (NVIDIA's
datasheet: 989 dense bf16/fp16 TFLOP/s, 67 fp32, 3.35 TB/s HBM3; ~4 µs per launch from the
host), ``cpu`` one core of an AVX-512 server as the harness runs it (one thread: ~115 fp32
GFLOP/s, the harness's sanity line on the development machine; ~12 GB/s read; ~2.5 GB/s
written into fresh buffers, whose pages fault in on first touch; ops moving under 1 MiB run
from cache at ~50 GB/s; ~8 µs of eager dispatch per op, which decides decode-sized calls).
On the CPU the model puts the crossover near 8 tokens per row for d = o = 1024, r = 16,
m = 8 in float32, where the layer suite (``python -m benchmarks.run --only layer``)
measures it; on the H100 model near 16.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch


class Op(NamedTuple):
    name: str
    flops: float
    read: float  # bytes read from main memory
    write: float  # bytes written
    gemm: bool = False  # a matrix product (counted by torch.utils.flop_counter); else elementwise or a copy




@dataclass(frozen=True)
class DeviceModel:
    name: str
    peak_flops: Dict[str, float]  # by element size in bytes: 2 (bf16/fp16), 4 (fp32), 8 (fp64)
    read_bw: float  # bytes/s read from main memory
    write_bw: float  # bytes/s written (on a CPU, into fresh buffers: page faults make it slower)
    launch_s: float  # fixed cost per op
    cache_bytes: float = 0.0  # an op moving at most this many bytes runs from cache ...
    cache_bw: float = 0.0  # ... at this bandwidth (0: no cache modelled)

    def peak(self, elem_bytes: int) -> float:
        return self.peak_flops.get(str(elem_bytes), min(self.peak_flops.values()))


H100 = DeviceModel("H100 SXM (datasheet)", {"2": 989e12, "4": 67e12, "8": 34e12}, 3.35e12, 3.35e12, 4e-6)
CPU_CORE = DeviceModel("one AVX-512 core (eager PyTorch)", {"2": 30e9, "4": 115e9, "8": 57e9}, 12e9, 2.5e9, 8e-6,
                       cache_bytes=1 << 20, cache_bw=50e9)
DEVICE_MODELS = {"cuda": H100, "cpu": CPU_CORE}


class Shape(NamedTuple):
    """The numbers a routed call's cost depends on."""

    N: int  # tokens
    R: int  # routing rows
    h: int
    m: int  # skills
    K: int  # slots per row and head
    d: int
    o: int
    r: int
    elem: int  # bytes per element of x / A / B
    combine: str


def _mm(name, batch, M, K, N, e, extra_read=0.0) -> Op:
    """A (batched) GEMM ``(M×K)·(K×N)``: reads both operands, writes the result once."""
    return Op(name, 2.0 * batch * M * K * N, e * batch * (M * K + K * N) + extra_read, float(e * batch * M * N), True)


def _rw(name, numbers, e, passes=2) -> Op:
    """An elementwise or copy pass over ``numbers`` elements: ``passes - 1`` reads, one write."""
    return Op(name, float(numbers), float(e * numbers * (passes - 1)), float(e * numbers))


def _contract(name, reads, writes, e) -> Op:
    """An einsum contraction reading ``reads`` numbers into ``writes``: 2 flops per read product."""
    return Op(name, 2.0 * reads, float(e * reads), float(e * writes), True)


def row_mixed_ops(s: Shape, backward: bool) -> List[Op]:
    N, R, h, m, K, d, o, r, e = s.N, s.R, s.h, s.m, s.K, s.d, s.o, s.r, s.elem
    S = N // R if R else 0
    dh, oh = d // h, o // h
    if s.combine == "params":
        rr = r
        ops = [_mm("mix A", h, R, m, dh * r, e), _mm("mix B", h, R, m, r * oh, e)]
        if h > 1:
            ops += [_rw("heads A", R * d * r, e), _rw("heads B", R * r * o, e)]
    else:
        rr = K * r
        ops = [_rw("stack A", R * K * d * r, e), _rw("stack B", R * K * r * o, e, passes=3)]
    ops += [_mm("x A", R, S, d, rr, e), _mm("u B + base", R, S, rr, o, e, extra_read=e * N * o)]
    if not backward:
        return ops
    ops += [_mm("g B^T", R, S, o, rr, e), _mm("dU A^T", R, S, rr, d, e), _mm("x^T dU", R, d, S, rr, e),
            _mm("u^T g", R, rr, S, o, e)]
    if s.combine == "params":
        ops += [_mm("dA", h, m, R, dh * r, e), _mm("dw A", h, R, dh * r, m, e), _mm("dB", h, m, R, r * oh, e),
                _mm("dw B", h, R, r * oh, m, e)]
        if h > 1:
            ops += [_rw("heads dA", R * d * r, e), _rw("heads dB", R * r * o, e)]
    else:
        ops += [_rw("skills dA", R * K * d * r, e), _mm("dA", 1, m, R * K, d * r, e),
                _mm("dB", 1, m, R * K, r * o, e), _mm("dw", 1, R * K, r * o, m, e)]
    return ops


def rank_space_ops(s: Shape, backward: bool) -> List[Op]:
    N, h, m, d, o, r, e = s.N, s.h, s.m, s.d, s.o, s.r, s.elem
    dh, oh = d // h, o // h
    Z = h * N * m * r  # every skill's rank-space activation of every token
    ops = [_rw("token weights", N * h * m, e), _rw("A_all", m * d * r, e), _mm("x A_all", h, N, dh, m * r, e)]
    if s.combine == "params":
        ops += [_contract("mix u", Z, N * r, e), _rw("scale u", N * r, e), _rw("weights x u", Z, e)]
    else:
        ops += [_rw("weights x Z", Z, e, passes=3)]
    ops += [_mm("V B_all", h, N, m * r, oh, e)]
    if h > 1:
        ops += [_rw("heads y", N * o, e)]
    ops += [_rw("base + delta", N * o, e, passes=3)]
    if not backward:
        return ops
    ops += [_rw("token weights", N * h * m, e), _mm("g B_all^T", h, N, oh, m * r, e), _rw("V", Z, e, passes=3)]
    if s.combine == "params":
        ops += [_contract("du", Z, N * r, e), _rw("dZ", Z, e, passes=3)]
    else:
        ops += [_rw("dZ", Z, e, passes=3)]
    ops += [_mm("x A_all (again)", h, N, dh, m * r, e)]
    ops += ([_contract("dw G.u", Z, N * h * m, e), _contract("dw Z.du", Z, N * h * m, e)] if s.combine == "params"
            else [_contract("dw G.Z", Z, N * h * m, e)])
    ops += [_mm("dB", h, m * r, N, oh, e), _mm("dA", h, dh, N, m * r, e), _mm("dx", h, N, m * r, dh, e),
            _rw("row grads", N * h * m, e)]
    if h > 1:
        ops += [_rw("heads g, dx", N * (o + d), e)]
    return ops


OP_COUNTS = {"row_mixed": row_mixed_ops, "rank_space": rank_space_ops}


def op_counts(algorithm: str, s: Shape, backward: bool) -> List[Op]:
    return OP_COUNTS[algorithm](s, backward)


def estimate(ops: List[Op], model: DeviceModel, elem_bytes: int) -> float:
    """Roofline seconds of ``ops`` on ``model``."""
    peak = model.peak(elem_bytes)

    def memory_s(op: Op) -> float:
        if op.read + op.write <= model.cache_bytes:
            return (op.read + op.write) / model.cache_bw
        return op.read / model.read_bw + op.write / model.write_bw
    return sum(max(op.flops / peak, memory_s(op)) + model.launch_s for op in ops)


def shape_of(x, A, B, idx, rows, combine) -> Shape:
    h, m, _, r = A.shape
    return Shape(x.shape[0], rows.n_rows, h, m, m if idx is None else idx.shape[2], x.shape[1], h * B.shape[-1], r,
                 x.element_size(), combine)


def cheaper(s: Shape, device_type: str, backward: bool) -> str:
    """The algorithm with the lower roofline estimate for shape ``s`` on ``device_type``'s model."""
    model = DEVICE_MODELS.get(device_type, H100)
    cost = {name: estimate(op_counts(name, s, backward), model, s.elem) for name in OP_COUNTS}
    return min(cost, key=cost.get)


_choices: Dict[tuple, str] = {}  # every layer of a model asks for the same few shapes, every step
_assumed: Optional[str] = None


@contextmanager
def assume_device(device_type: str):
    """Choose as if the tensors were on ``device_type`` (the cost harness prices an H100 from CPU runs)."""
    global _assumed
    if device_type not in DEVICE_MODELS:
        raise ValueError(f"device_type: expected one of {tuple(DEVICE_MODELS)}, got {device_type!r}")
    prev, _assumed = _assumed, device_type
    try:
        yield
    finally:
        _assumed = prev


def choose(x, A, B, idx, rows, combine, backward: bool = True) -> str:
    """``"row_mixed"`` or ``"rank_space"``: the lower roofline estimate on this device's model."""
    if rows.seq_len is None or rows.n_rows == 0:
        return "rank_space"
    key = (shape_of(x, A, B, idx, rows, combine), _assumed or x.device.type, backward)
    if torch.compiler.is_compiling():  # a trace-time constant; no global state in the graph
        return cheaper(*key)
    name = _choices.get(key)
    if name is None:
        if len(_choices) > 4096:
            _choices.clear()
        name = _choices[key] = cheaper(*key)
    return name
