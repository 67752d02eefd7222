"""The csrc kernel built for the host emulator (csrc/emulate), called on CPU tensors.

Builds ``csrc/emulate/emu_exports.cpp`` with g++ once per source hash and loads it with
ctypes. :func:`group_by_row` takes and returns tensors the way the ``routedlora_cuda`` op
of ``csrc/bindings.cpp`` does (same scratch size), so the same Python code can drive either.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from routedlora import cuda_build

CSRC = Path(__file__).resolve().parent.parent / "csrc"

_lib = None


def cuda_include() -> Optional[str]:
    """The toolkit's include dir (for cuda_runtime_api.h), or None."""
    return cuda_build.cuda_include_dir()


def unavailable_reason() -> Optional[str]:
    if shutil.which("g++") is None:
        return "no g++ to build the emulator"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_runtime_api.h) found"
    return None


def library():
    global _lib
    if _lib is not None:
        return _lib
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")) + \
        sorted((CSRC / "emulate").glob("*"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"routedlora-emu-{digest}" / "librl_emu.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror",
               "-DRL_EMULATE", f"-I{cuda_include()}", str(CSRC / "emulate" / "emu_exports.cpp"), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.rl_emu_group_scratch_numel.restype = i64
    lib.rl_emu_group_scratch_numel.argtypes = [i64]
    lib.rl_emu_group_by_row.restype = i32
    lib.rl_emu_group_by_row.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.rl_emu_count.argtypes = [i32]
    lib.rl_emu_count_size.restype = i64
    lib.rl_emu_count_copy.argtypes = [ptr]
    _lib = lib
    return lib


@contextlib.contextmanager
def counting():
    """Yields a list that, after the block, holds one list per emulated launch in it, of the
    ``(address, bytes, is_store)`` of every global-memory access that launch made."""
    lib = library()
    launches = []
    lib.rl_emu_count(1)
    try:
        yield launches
    finally:
        n = lib.rl_emu_count_size()
        raw = torch.empty(3 * n, dtype=torch.int64)
        lib.rl_emu_count_copy(ctypes.c_void_p(raw.data_ptr()))
        lib.rl_emu_count(0)
        for event in map(tuple, raw.view(n, 3).tolist()):
            if event[2] == 2:
                launches.append([])
            else:
                launches[-1].append(event)


def traffic(events, tensors: dict) -> dict:
    """``{name: (bytes requested, distinct bytes)}`` of the accesses that fall in each tensor's storage."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            continue
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        hits = [(a, b) for a, b, _ in events if lo <= a < hi]
        touched = set()
        for a, b in hits:
            touched.update(range(a, a + b))
        out[name] = (sum(b for _, b in hits), len(touched))
    return out


def _p(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


# the scratch buffer of the last emulated launch (the traffic tests attribute accesses to it)
last_scratch: dict = {}


def group_by_row(route_ids, R: int):
    """``(order, srows, offs)`` from the emulated grouping kernel; mirrors ``routedlora_cuda::group_by_row``."""
    lib = library()
    rid = route_ids.long().contiguous()
    N = rid.shape[0]
    order = torch.empty(N, dtype=torch.int64)
    srows = torch.empty(N, dtype=torch.int64)
    offs = torch.empty(R + 1, dtype=torch.int64)
    scratch = torch.empty(lib.rl_emu_group_scratch_numel(R), dtype=torch.int32)
    err = lib.rl_emu_group_by_row(_p(rid), N, R, _p(order), _p(srows), _p(offs), _p(scratch))
    if err:
        raise RuntimeError(f"group_by_row: launch refused (cudaError {err})")
    last_scratch.clear()
    last_scratch.update(scratch=scratch)
    return order, srows, offs


# --- the same function as a torch custom op, so torch.compile can trace the backend ---


@torch.library.custom_op("routedlora_emu::group_by_row", mutates_args=())
def _group_op(route_ids: torch.Tensor, R: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_by_row(route_ids, R)


@_group_op.register_fake
def _(route_ids, R):  # mirrors group_by_row_meta in bindings.cpp
    N = route_ids.shape[0]
    new = lambda *s: route_ids.new_empty(*s, dtype=torch.int64)  # noqa: E731
    return new(N), new(N), new(R + 1)


class ops:
    """Stand-in for ``torch.ops.routedlora_cuda`` (for ``cuda_backend.use_kernels``)."""

    group_by_row = staticmethod(_group_op)
