"""The backend switch: ``"auto" | "torch" | "triton" | "cuda"``.

Every backend computes the same function (DESIGN.md §3). A backend is a module
exposing ``forward(x, A, B, idx, w, route_ids, scale, combine, base)`` and
``backward(...)`` (the contract is in :mod:`routedlora.ops.torch_backend`).

* ``torch``: the reference, any device.
* ``triton``: fused kernels (:mod:`routedlora.ops.triton_backend`); needs triton and
  a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``, slow, for tests).
* ``cuda``: the CUDA C++ kernels of ``csrc/`` (decode-sized forward, token grouping),
  built with ninja on first use, and the triton kernels for the rest
  (:mod:`routedlora.ops.cuda_backend`, whose ``coverage()`` says which part runs where).
  Refuses with :class:`~routedlora.cuda_build.CudaBackendUnavailable` naming what is
  missing (a CUDA build of torch, a GPU, nvcc, ninja, triton); never falls back silently.

``auto`` resolves to ``torch`` in this release: the triton and cuda backends have been
validated on the Triton interpreter and the csrc host emulator only, and ``auto`` will
prefer them once they have been checked and measured on a GPU.
"""
from __future__ import annotations

from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


class CudaBackendUnavailable(RuntimeError):
    """``backend='cuda'`` cannot run here; the message says why and what to do."""


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device=None) -> ModuleType:
    """Map a backend name to its implementation module for tensors on ``device``."""
    if backend in ("auto", "torch"):  # every layer of every step: no import machinery on this path
        return _torch_backend()
    check_backend(backend)
    if backend == "cuda":
        from .ops import cuda_backend

        cuda_backend.require(device)
        return cuda_backend
    from .ops import triton_backend

    if not triton_backend.is_available(device):
        raise RuntimeError("backend='triton' needs the triton package and a CUDA device "
                           f"(tensors are on {device}); on the CPU set TRITON_INTERPRET=1 to run "
                           "the kernels in Triton's interpreter")
    return triton_backend


_TORCH = []


def _torch_backend() -> ModuleType:
    if not _TORCH:
        from .ops import torch_backend

        _TORCH.append(torch_backend)
    return _TORCH[0]


def available_backends(device=None) -> tuple:
    """Backend names that :func:`resolve_backend` accepts for ``device`` (default: CUDA if present).

    ``cuda`` is listed when its toolchain is present; it is built on first use, and a
    build failure then raises from :func:`resolve_backend`.
    """
    from .ops import cuda_backend, triton_backend

    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    names = ["torch"]
    if triton_backend.is_available(device):
        names.append("triton")
    if cuda_backend.is_available(device):
        names.append("cuda")
    return tuple(names)
