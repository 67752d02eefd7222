"""The backend switch: ``"auto" | "torch" | "triton" | "cuda"``.

Every backend computes the same function (DESIGN.md §3). A backend is a module
exposing ``forward(x, A, B, idx, w, route_ids, scale, combine, base)`` and
``backward(...)`` (the contract is in :mod:`routedlora.ops.torch_backend`).

* ``torch``: the reference, any device.
* ``triton``: fused kernels (:mod:`routedlora.ops.triton_backend`); needs triton and
  a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``, slow, for tests).
* ``cuda``: the triton kernels, fed the token grouping by the CUDA C++ kernel of ``csrc/``,
  built with ninja on first use (:mod:`routedlora.ops.cuda_backend`, whose ``coverage()``
  says which part runs where).
  Refuses with :class:`~routedlora.cuda_build.CudaBackendUnavailable` naming what is
  missing (a CUDA build of torch, a GPU, nvcc, ninja, triton); never falls back silently.

``auto``: ``torch`` on every device but CUDA. On a CUDA device it follows the report that
``python -m routedlora.selftest`` writes (:func:`report_path`): each call is put in a shape
class (:func:`call_shape_class`: ``decode`` for at most ``DECODE_TOKENS_PER_ROW`` tokens
per routing row, else ``rows``) and gets the fastest backend the report measured for that
class (``decode`` for ``decode``; ``model``, else ``design``, for ``rows``) among ``torch``
and the kernel backends none of whose checks failed and which passed at the call's dtype.
With no report, a stale one (another routedlora/torch/triton version or another GPU), or
no eligible kernel backend, ``auto`` is ``torch`` and says once, on the ``routedlora``
logger, how to enable the kernels. The report is read once per process and the choice is
memoised per (device, shape class, dtype): no file I/O and no host sync after the first call.
A first call met while ``torch.compile`` traces (``fullgraph=True`` included) makes the choice
eagerly and bakes it into the graph as a constant. ``auto`` changes the op's kernels only:
a layer with ``backend="auto"`` keeps the torch routers (PEFT-exact Gumbel draws).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

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
    # every layer of every step: no import machinery, no I/O on these paths
    if backend == "torch":
        return _torch_backend()
    if backend == "auto":
        if device is None:
            return _torch_backend()
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type != "cuda":
            return _torch_backend()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.compiler.is_compiling():
            _new_auto(index)  # a constant to dynamo, run before the trace reads the memo
        auto = _AUTO.get(index)
        return auto if auto is not None else _AUTO[_new_auto(index)]
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


# --- backend="auto" on CUDA: the self-test report decides ------------------------------

logger = logging.getLogger("routedlora")

REPORT_SCHEMA = 1
REPORT_NAME = "selftest.json"
KERNEL_BACKENDS = ("triton", "cuda")
# at most this many tokens per routing row is decode-like (DESIGN.md §2: rank space wins at ~1-8)
DECODE_TOKENS_PER_ROW = 8
# the self-test's measured shape classes that stand for a call's class, in order of preference
TIMING_CLASSES = {"decode": ("decode",), "rows": ("model", "design")}
ENABLE_HINT = "run `python -m routedlora.selftest` on this machine to check and time the triton/cuda kernels"

_AUTO: dict = {}  # device index -> _AutoBackend
_REPORT: list = []  # [(report or None, error text or None)] once read
_LOGGED: list = []


def call_shape_class(n_tokens: int, n_rows: int) -> str:
    """``"decode"`` for at most :data:`DECODE_TOKENS_PER_ROW` tokens per routing row (decode,
    token-level routing), else ``"rows"`` (training, prefill: long rows)."""
    return "decode" if n_tokens <= DECODE_TOKENS_PER_ROW * n_rows else "rows"


def report_path() -> Path:
    """Where the self-test writes its report: ``$ROUTEDLORA_CACHE_DIR/selftest.json``
    (default ``~/.cache/routedlora``, the cuda build's cache folder)."""
    from .cuda_build import cache_root

    return cache_root() / REPORT_NAME


def current_versions() -> dict:
    """The versions a report must have been written with to be trusted."""
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"routedlora": __version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda}


def read_report(path=None) -> Tuple[Optional[dict], Optional[str]]:
    """``(report, None)``, or ``(None, why not)`` when it is missing or unreadable."""
    path = Path(path) if path is not None else report_path()
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        return None, f"no self-test report at {path}"
    except (OSError, ValueError) as exc:
        return None, f"the self-test report {path} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        return None, f"the self-test report {path} has another schema (want {REPORT_SCHEMA})"
    return report, None


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def report_status(report: Optional[dict], gpu_name: Optional[str] = None, versions: Optional[dict] = None,
                  missing: Optional[str] = None) -> Tuple[str, str]:
    """``(status, why)``: status ``"none"``, ``"stale"``, ``"fail"`` or ``"pass"`` of a report for
    this machine (``gpu_name``: the CUDA device's name; None: the first visible one, if any)."""
    if report is None:
        return "none", missing or "no self-test report"
    versions = current_versions() if versions is None else versions
    if gpu_name is None and torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
    for key in ("routedlora", "torch", "triton"):
        if report.get("versions", {}).get(key) != versions.get(key):
            return "stale", (f"the self-test report was written with {key} {report.get('versions', {}).get(key)}, "
                             f"this is {versions.get(key)}")
    dev = report.get("device", {})
    failed = sorted({str(c.get("backend")) for c in report.get("checks", []) if c.get("status") == "fail"})
    if dev.get("type") != "cuda" and not failed:
        return "stale", "the self-test report comes from a run without CUDA (nothing compiled or timed)"
    if dev.get("type") == "cuda" and gpu_name is not None and dev.get("name") != gpu_name:
        return "stale", f"the self-test report is for {dev.get('name')}, this GPU is {gpu_name}"
    if failed:
        return "fail", f"checks failed for backend(s) {', '.join(failed)}"
    return "pass", "every check passed"


def auto_choice(report: Optional[dict], gpu_name: str, shape_class: str, dtype, versions: Optional[dict] = None,
                missing: Optional[str] = None) -> Tuple[str, str, bool]:
    """What ``auto`` runs for a call of ``shape_class`` (:func:`call_shape_class`) at ``dtype``
    on the GPU ``gpu_name``: ``(backend, why, hint)``; ``hint``: running the self-test would help.

    A kernel backend is eligible when it has checks in the report, none of them failed, and
    one of them passed at ``dtype``; the choice is the fastest of ``torch`` and the eligible
    ones in the report's timings of the class (``decode``; ``model``, else ``design``, for
    ``rows``). Anything missing, stale or failed leaves ``torch``.
    """
    status, why = report_status(report, gpu_name, versions, missing)
    if status in ("none", "stale"):
        return "torch", why, True
    if report.get("device", {}).get("type") != "cuda":
        return "torch", "the self-test report comes from a run without CUDA", True
    dt = _dtype_name(dtype)
    checks = report.get("checks", [])
    eligible = []
    for b in KERNEL_BACKENDS:
        mine = [c for c in checks if c.get("backend") == b]
        if mine and not any(c.get("status") == "fail" for c in mine) and any(
                c.get("status") == "pass" and c.get("dtype") == dt for c in mine):
            eligible.append(b)
    if not eligible:
        return "torch", f"no kernel backend passed every check at {dt} ({why})", status == "fail"
    for name in TIMING_CLASSES.get(shape_class, ()):
        timed = report.get("timings", {}).get(name, {}).get("backends", {})
        times = {b: t["median_ms"] for b, t in timed.items()
                 if b in ("torch", *eligible) and isinstance(t, dict) and t.get("median_ms") is not None}
        if times:
            best = min(times, key=times.get)
            return best, f"fastest of {sorted(times)} in the self-test's {name!r} timings ({times[best]:.4g} ms)", False
    return "torch", f"the self-test report has no timings for {shape_class!r} calls", True


def cached_report() -> Tuple[Optional[dict], Optional[str]]:
    """The report as this process read it first (see :func:`reset_auto`)."""
    if not _REPORT:
        _REPORT.append(read_report())
    return _REPORT[0]


def reset_auto() -> None:
    """Forget the report and every ``auto`` choice of this process (after a new self-test)."""
    _AUTO.clear()
    _REPORT.clear()
    _LOGGED.clear()


def _log_once(message: str) -> None:
    if not _LOGGED:
        _LOGGED.append(message)
        logger.warning(message)


class _AutoBackend:
    """``backend="auto"`` on one CUDA device: per (shape class, dtype), the backend the report picks.

    Exposes ``plan`` as a backend module does; the choice is made on the first call of a
    class and dtype and kept (``choices`` records it with the reason)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gpu_name = torch.cuda.get_device_name(device)
        self._impl: dict = {}
        self.choices: dict = {}

    def plan(self, x, A, B, idx, rows, combine, backward=True):
        key = ("decode" if rows.n_tokens <= DECODE_TOKENS_PER_ROW * rows.n_rows else "rows", x.dtype)
        if torch.compiler.is_compiling():  # the choice enters the graph as a constant, made on first trace
            impl = _module(_resolve_name(self.device.index, key[0], _dtype_name(x.dtype)))
        else:
            impl = self._impl.get(key)
            if impl is None:
                impl = self.resolve(*key)
        return impl.plan(x, A, B, idx, rows, combine, backward)

    def resolve(self, shape_class: str, dtype) -> ModuleType:
        report, missing = cached_report()
        name, why, hint = auto_choice(report, self.gpu_name, shape_class, dtype, missing=missing)
        module = _torch_backend()
        if name != "torch":
            try:
                module = resolve_backend(name, self.device)
            except Exception as exc:  # e.g. the cuda build went away since the self-test
                name, why, hint = "torch", f"backend {name!r} passed the self-test but is unusable now ({exc})", True
        if hint:
            _log_once(f"backend='auto' runs the torch backend on {self.gpu_name}: {why}. To let it pick the "
                      f"faster kernels, {ENABLE_HINT} (writes {report_path()})")
        self._impl[(shape_class, dtype)] = module
        self.choices[(shape_class, _dtype_name(dtype))] = (name, why)
        return module


def _constant_for_dynamo(fn):
    """What ``torch._dynamo.assume_constant_result`` does (without importing dynamo here): a first
    call met while ``torch.compile`` traces runs eagerly (file I/O, the GPU's name, a build) and
    its result is a constant of the graph, instead of breaking it."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_dynamo
def _new_auto(index: int) -> int:
    if index not in _AUTO:
        _AUTO[index] = _AutoBackend(torch.device("cuda", index))
    return index


def _module(name: str) -> ModuleType:
    from .ops import cuda_backend, torch_backend, triton_backend

    return {"torch": torch_backend, "triton": triton_backend, "cuda": cuda_backend}[name]


@_constant_for_dynamo
def _resolve_name(index: int, shape_class: str, dtype_name: str) -> str:
    auto = _AUTO[index]
    if (shape_class, dtype_name) not in auto.choices:
        auto.resolve(shape_class, getattr(torch, dtype_name))
    return auto.choices[(shape_class, dtype_name)][0]


def auto_resolves_to(device=None, shape_class: str = "rows", dtype=torch.bfloat16) -> Tuple[str, str]:
    """``(backend, why)`` that ``auto`` would run for a call of ``shape_class`` at ``dtype`` on ``device``
    (default: CUDA if present), without building or loading anything."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", f"auto is torch on {device.type} tensors"
    report, missing = cached_report()
    name, why, _ = auto_choice(report, torch.cuda.get_device_name(device), shape_class, dtype, missing=missing)
    return name, why
