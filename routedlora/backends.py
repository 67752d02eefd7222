"""The backend switch: ``"auto" | "torch" | "triton" | "cuda"``.

Every backend computes the same function (DESIGN.md §3). A backend is a module
object exposing ``forward(x, A, B, idx, w, route_ids, scale, combine)`` and
``backward(...)`` (see :mod:`routedlora.ops.torch_backend` for the contract).
Only ``torch`` exists in this release; the others are named so that code
written against the switch keeps working when they land.
"""
from __future__ import annotations

from types import ModuleType

BACKENDS = ("auto", "torch", "triton", "cuda")
_PLANNED = {"triton": "the fused Triton kernels", "cuda": "the CUDA C++ kernels in csrc/"}


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device=None) -> ModuleType:
    """Map a backend name to its implementation module; ``auto`` picks the fastest available."""
    check_backend(backend)
    if backend in _PLANNED:
        raise NotImplementedError(
            f"backend={backend!r} ({_PLANNED[backend]}) is not implemented yet; "
            "use backend='torch' or backend='auto'"
        )
    from .ops import torch_backend

    return torch_backend


def available_backends() -> tuple:
    """Names that :func:`resolve_backend` accepts on this install, ``auto`` excluded."""
    return ("torch",)
