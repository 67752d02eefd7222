"""Check routedlora's kernels on this machine against the torch reference, time them, and let ``auto`` choose.

``python -m routedlora.selftest [--shapes model|design|decode ...] [--json PATH]``

On a CUDA device, for each shape class:

* ``model``: the user's typical layer (``--d``, ``--o``, ``--r``, ``--m``, ``--tokens``,
  ``--seq-len``; default d=o=4096, r=16, m=8, 4096 tokens in rows of 256),
* ``design``: DESIGN.md §2's design point (d=o=4096, r=16, m=8, 64 sequences x 256 tokens,
  one routing row each), with fewer sequences if it would not fit in a quarter of free memory,
* ``decode``: one token per sequence (8 sequences, the model's d, o, r, m),

every kernel backend (``triton``, ``cuda``) runs ``routedlora.ops.routed_lora`` forward and
backward (gradients of x, A, B and the routing weights, base linear fused) for both combines
(``params`` with h in {1, 4}, ``outputs`` with h = 1) in bfloat16, float16 and float32, and is
compared with the torch backend computing from the same values in float32. The error is
``max |got - ref| / max |ref|`` per output and gradient, against :data:`TOLERANCE`.
Then a routed layer under ``torch.compile`` (inductor) is compared with eager (forward and
backward), and a decode step captured in a CUDA graph is replayed on new inputs. Last, per
shape class, ``torch`` and each backend whose checks passed are timed side by side: forward
+ backward (``model``, ``design``) or forward without grad (``decode``), at ``--dtype``
(default bfloat16) with ``--heads`` heads (default 4), in interleaved rounds with the order
rotating, medians and quartiles of CUDA-event times (DESIGN.md §2), and the frozen base
linear timed alongside for the overhead.

The report (JSON: versions, GPU, every check with its error text, timings, the fastest
passing backend per class) goes to :func:`routedlora.backends.report_path` and to
``--json PATH``; ``backend="auto"`` reads it (see :mod:`routedlora.backends`).

Without CUDA it runs what it can: the triton kernels in Triton's interpreter on tiny
shapes, in float32 and float16 (bfloat16 ``tl.dot`` is wrong in the interpreter,
triton-lang/triton#11584), and the cuda backend's csrc kernels in their host emulator
(``tests/csrc_emulator.py`` of a source checkout, with g++ and the CUDA headers). The
command sets ``TRITON_INTERPRET=1`` itself when no CUDA device is visible, provided the
triton kernels were not imported before in the process (they read it when defined);
otherwise the triton checks are listed as not run. No compiled kernel, no timing, no
``torch.compile``/CUDA-graph check runs there, and the report says so; ``auto`` ignores
such a report.

Exit code 0 when every check that ran passed, 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

SHAPE_CLASSES = ("model", "design", "decode")
DTYPES = ("bfloat16", "float16", "float32")
# max |got - ref| / max |ref| against torch in float32 from the same (rounded) inputs. float32:
# ieee dots (TF32 off), only the summation order differs; 16-bit: operands rounded to 16 bits
# with float32 accumulation, and the output (and the gradients) rounded once more
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
CASES = (("params", 1), ("params", 4), ("outputs", 1))  # (combine, heads)
OUTPUTS = ("y", "dx", "dA", "dB", "dw")


def _torch():
    import torch

    return torch


# --- shapes -------------------------------------------------------------------------------


def shapes(args, on_gpu: bool) -> Dict[str, dict]:
    """Per shape class: d, o, r, m, tokens, seq_len (tokens per routing row), K (outputs slots)."""
    if on_gpu:
        d = args.d or 4096
        model = dict(d=d, o=args.o or d, r=args.r or 16, m=args.m or 8, tokens=args.tokens or 4096,
                     seq_len=args.seq_len or 256)
        design = dict(d=4096, o=4096, r=16, m=8, tokens=64 * 256, seq_len=256)
    else:  # the interpreter runs every program element by element: tiny shapes only
        d = args.d or 32
        model = dict(d=d, o=args.o or d, r=args.r or 4, m=args.m or 4, tokens=args.tokens or 8,
                     seq_len=args.seq_len or 4)
        design = dict(d=32, o=32, r=4, m=4, tokens=16, seq_len=4)
    model["seq_len"] = min(model["seq_len"], model["tokens"])
    model["tokens"] -= model["tokens"] % model["seq_len"]
    decode = dict(model, tokens=8 if on_gpu else 4, seq_len=1)
    out = {"model": model, "design": design, "decode": decode}
    for s in out.values():
        s["K"] = min(2, s["m"])
    return out


def _fit_design(shape: dict, device) -> dict:
    """Halve the sequences until the checks' buffers (float32 reference included) fit in a quarter of free memory."""
    torch = _torch()
    free, _ = torch.cuda.mem_get_info(device)
    shape = dict(shape)
    # x, y, dx, base, gradient and their float32 copies: about 12 (N, max(d, o)) float32 arrays
    while shape["tokens"] > shape["seq_len"] and 12 * 4 * shape["tokens"] * max(shape["d"], shape["o"]) > free / 4:
        shape["tokens"] //= 2
    shape["scaled_from_tokens"] = 64 * 256
    return shape


# --- one check of the op ----------------------------------------------------------------


def make_inputs(shape: dict, h: int, combine: str, dtype, device, seed: int = 0) -> dict:
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    d, o, r, m, N, S = shape["d"], shape["o"], shape["r"], shape["m"], shape["tokens"], shape["seq_len"]
    R = N // S

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    inp = dict(x=rnd(N, d), A=rnd(h, m, d // h, r, scale=(d // h) ** -0.5), B=rnd(h, m, r, o // h, scale=r ** -0.5),
               weight=rnd(o, d, scale=d ** -0.5), bias=rnd(o, scale=0.1), seq_len=S,
               cot=torch.randn(N, o, generator=g).to(device))
    if combine == "params":  # dense routing (Poly, MHR)
        inp["idx"] = None
        inp["w"] = torch.rand(R, h, m, generator=g).to(device)
    else:  # top-K slots (MTA, MoE-LoRA)
        K = shape["K"]
        inp["idx"] = torch.stack([torch.randperm(m, generator=g)[:K] for _ in range(R)]).view(R, 1, K).to(device)
        inp["w"] = torch.rand(R, 1, K, generator=g).to(device)
    return inp


def run_op(backend: str, inp: dict, combine: str, dtype=None, grad: bool = True):
    """``[y, dx, dA, dB, dw]`` of the op (``dtype``: cast the inputs first, e.g. float32 for the reference)."""
    torch = _torch()
    from .ops import routed_lora

    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaves = [cast(inp[k]).clone().requires_grad_(grad) for k in ("x", "A", "B")] + \
        [inp["w"].clone().requires_grad_(grad)]
    y = routed_lora(leaves[0], leaves[1], leaves[2], inp["idx"], leaves[3], seq_len=inp["seq_len"], scale=0.5,
                    combine=combine, weight=cast(inp["weight"]), bias=cast(inp["bias"]), backend=backend)
    if not grad:
        return [y]
    grads = torch.autograd.grad((y.float() * inp["cot"]).sum(), leaves)
    return [y] + list(grads)


def rel_err(got, ref) -> float:
    if ref.numel() == 0:
        return 0.0
    got, ref = got.detach().double(), ref.detach().double()
    if not bool(torch_isfinite_all(got)):
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def torch_isfinite_all(t):
    return _torch().isfinite(t).all()


def check_op(backend: str, cls: str, shape: dict, dtype_name: str, combine: str, h: int, device) -> dict:
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    rec = dict(name=f"op {backend} {cls} {dtype_name} {combine} h={h}", kind="op", backend=backend, shape_class=cls,
               dtype=dtype_name, combine=combine, heads=h, tolerance=TOLERANCE[dtype_name], status="fail",
               error=None, rel_err={})
    try:
        inp = make_inputs(shape, h, combine, dtype, device, seed=zlib.crc32(f"{cls}{combine}{h}".encode()) % 1000)
        ref = run_op("torch", inp, combine, dtype=torch.float32)
        got = run_op(backend, inp, combine)
        for name, a, b in zip(OUTPUTS, got, ref):
            if a.shape != b.shape or a.dtype != (dtype if name != "dw" else b.dtype):
                raise AssertionError(f"{name}: got {tuple(a.shape)} {a.dtype}, want {tuple(b.shape)}")
            rec["rel_err"][name] = rel_err(a, b)
        bad = {k: v for k, v in rec["rel_err"].items() if not v <= TOLERANCE[dtype_name]}
        if bad:
            rec["error"] = "relative error above %g: %s" % (
                TOLERANCE[dtype_name], ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
        else:
            rec["status"] = "pass"
    except Exception as exc:
        rec["error"] = _error(exc)
    return rec


def _error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:2000] + where


# --- GPU-only checks ----------------------------------------------------------------------


def _layer(backend: str, shape: dict, h: int, dtype, device):
    torch = _torch()
    from .layer import RoutedLoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(shape["d"], shape["o"], device=device, dtype=dtype)
    layer = RoutedLoraLinear(base, n_tasks=8, n_skills=shape["m"], r=shape["r"], n_heads=h, gumbel=False,
                             backend=backend).to(device=device, dtype=dtype)
    with torch.no_grad():  # init_weights leaves B at zero: a zero delta would hide errors
        layer.lora_B.normal_(0, shape["r"] ** -0.5)
    return layer


def check_compile(backend: str, shape: dict, h: int, dtype_name: str, device) -> dict:
    """A routed layer under torch.compile (inductor) against eager: output and lora_A/lora_B gradients."""
    torch = _torch()
    rec = dict(name=f"torch.compile {backend} {dtype_name} h={h}", kind="compile", backend=backend, dtype=dtype_name,
               heads=h, tolerance=TOLERANCE[dtype_name], status="fail", error=None, rel_err={})
    try:
        dtype = getattr(torch, dtype_name)
        layer = _layer(backend, shape, h, dtype, device)
        x = torch.randn(4, 16, shape["d"], device=device, dtype=dtype)
        tids = torch.tensor([0, 3, 3, 7], device=device)

        def step(fn):
            layer.zero_grad(set_to_none=True)
            y = fn(x, task_ids=tids)
            y.float().square().mean().backward()
            return [y, layer.lora_A.grad, layer.lora_B.grad]

        eager = step(layer)
        torch._dynamo.reset()
        compiled = step(torch.compile(layer, backend="inductor"))
        for name, a, b in zip(("y", "dA", "dB"), compiled, eager):
            rec["rel_err"][name] = rel_err(a, b)
        bad = {k: v for k, v in rec["rel_err"].items() if not v <= TOLERANCE[dtype_name]}
        rec["status"] = "fail" if bad else "pass"
        rec["error"] = f"compiled differs from eager: {bad}" if bad else None
    except Exception as exc:
        rec["error"] = _error(exc)
    return rec


def check_cuda_graph(backend: str, shape: dict, h: int, dtype_name: str, device) -> dict:
    """A decode step (one token per sequence, no grad) captured in a CUDA graph, replayed on new inputs."""
    torch = _torch()
    from .inject import routing

    rec = dict(name=f"CUDA graph decode {backend} {dtype_name} h={h}", kind="cuda_graph", backend=backend,
               dtype=dtype_name, heads=h, tolerance=TOLERANCE[dtype_name], status="fail", error=None, rel_err={})
    try:
        dtype = getattr(torch, dtype_name)
        layer = _layer(backend, shape, h, dtype, device).eval()
        B = shape["tokens"]
        tids = torch.arange(B, device=device) % 8
        static_x = torch.randn(B, 1, shape["d"], device=device, dtype=dtype)
        new_x = torch.randn_like(static_x)
        with torch.no_grad(), routing(layer, tids, validate=False):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm up (builds, autotunes, routes) outside the capture
                for _ in range(2):
                    layer(static_x)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(static_x)
            static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize(device)
            ref = layer(new_x)
        rec["rel_err"]["y"] = rel_err(out, ref)
        ok = rec["rel_err"]["y"] <= TOLERANCE[dtype_name]
        rec["status"] = "pass" if ok else "fail"
        rec["error"] = None if ok else f"replay differs from eager: {rec['rel_err']['y']:.3g}"
    except Exception as exc:
        rec["error"] = _error(exc)
    return rec


# --- timing -------------------------------------------------------------------------------


def time_interleaved(fns: Dict[str, Callable[[], object]], device, rounds: int = 10,
                     min_sample_s: float = 0.005) -> Dict[str, dict]:
    """Milliseconds per call of each function, measured as the benchmark harness does
    (:func:`routedlora.timing.interleaved`: rounds in rotating order, CUDA-event samples,
    medians and quartiles); a function that fails its warm-up is reported, not timed."""
    from .timing import interleaved

    torch = _torch()
    out: Dict[str, dict] = {}
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize(device)
            live[name] = fn
        except Exception as exc:
            out[name] = dict(median_ms=None, error=_error(exc))
    if live:
        timed = interleaved(live, torch.device(device), rounds=rounds, warmup=0, min_sample_s=min_sample_s)
        for name in live:
            st = timed.stats(name)
            out[name] = dict(median_ms=st["median_ms"], q1_ms=st["q1_ms"], q3_ms=st["q3_ms"], rounds=st["runs"],
                             inner=st["inner"])
    return out


def time_class(cls: str, shape: dict, backends: List[str], h: int, dtype_name: str, device, rounds: int) -> dict:
    """One shape class, as a model runs it: the op owns the base linear, no validation; training
    classes time forward + backward (all four gradients), decode the forward without grad."""
    torch = _torch()
    from .ops import routed_lora

    dtype = getattr(torch, dtype_name)
    inp = make_inputs(shape, h, "params", dtype, device, seed=7)
    train = cls != "decode"
    leaves = [inp[k].clone().requires_grad_(train) for k in ("x", "A", "B", "w")]
    gy = inp["cot"].to(dtype)

    def op(b):
        with torch.set_grad_enabled(train):
            y = routed_lora(leaves[0], leaves[1], leaves[2], inp["idx"], leaves[3], seq_len=inp["seq_len"], scale=0.5,
                            combine="params", weight=inp["weight"], bias=inp["bias"], backend=b, validate=False)
            if train:
                torch.autograd.grad(y, leaves, grad_outputs=gy)

    def base():
        with torch.set_grad_enabled(train):
            y = torch.nn.functional.linear(leaves[0], inp["weight"], inp["bias"])
            if train:
                torch.autograd.grad(y, leaves[:1], grad_outputs=gy)

    fns = {b: (lambda b=b: op(b)) for b in ["torch"] + backends}
    fns["base"] = base
    timed = time_interleaved(fns, device, rounds=rounds)
    base_ms = timed.pop("base", {}).get("median_ms")
    for t in timed.values():
        if base_ms and t.get("median_ms") is not None:
            t["overhead_over_base"] = (t["median_ms"] - base_ms) / base_ms
    ok = {b: t["median_ms"] for b, t in timed.items() if t.get("median_ms") is not None}
    return dict(measures="forward+backward" if train else "forward (no grad)", dtype=dtype_name, heads=h,
                combine="params", shape=shape, base_ms=base_ms, backends=timed,
                fastest=min(ok, key=ok.get) if ok else None)


# --- environment --------------------------------------------------------------------------


def versions() -> dict:
    from .backends import current_versions
    from .cuda_build import find_nvcc

    v = current_versions()
    v.update(python=platform.python_version(), platform=platform.platform(), nvcc=find_nvcc())
    return v


def _enable_interpreter() -> Optional[str]:
    """Set TRITON_INTERPRET=1 if the triton kernels can still see it; else say why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "routedlora.triton_kernels.routed_lora" in sys.modules:
        return ("the triton kernels were imported in this process without TRITON_INTERPRET=1; "
                "run `TRITON_INTERPRET=1 python -m routedlora.selftest`")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def load_emulator():
    """``(tests/csrc_emulator module, None)`` from a source checkout, or ``(None, why not)``."""
    if "csrc_emulator" in sys.modules:
        return sys.modules["csrc_emulator"], None
    path = Path(__file__).resolve().parent.parent / "tests" / "csrc_emulator.py"
    if not path.exists():
        return None, f"no csrc host emulator in this install ({path} is absent: it ships with a source checkout)"
    try:
        spec = importlib.util.spec_from_file_location("csrc_emulator", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["csrc_emulator"] = mod
        spec.loader.exec_module(mod)
        why = mod.unavailable_reason()
        if why is not None:
            return None, f"csrc host emulator: {why}"
        mod.library()
        return mod, None
    except Exception as exc:
        sys.modules.pop("csrc_emulator", None)
        return None, f"csrc host emulator could not be built: {_error(exc)}"


# --- the run ------------------------------------------------------------------------------


def run(args) -> dict:
    torch = _torch()
    on_gpu = torch.cuda.is_available() and not args.cpu
    not_checked: List[str] = []
    interp_reason = None if on_gpu else _enable_interpreter()
    from . import backends
    from .ops import cuda_backend, triton_backend

    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    dev_info = dict(type=device.type)
    if on_gpu:
        dev_info.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                        memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        dev_info.update(name=platform.processor() or platform.machine())
        not_checked.append("no CUDA device: no compiled kernel ran (triton ran in its interpreter, csrc in its "
                           "host emulator, where available), no timings, no torch.compile, no CUDA graphs; "
                           "backend='auto' ignores this report")
    shp = shapes(args, on_gpu)
    classes = args.shapes or list(SHAPE_CLASSES)
    if on_gpu and "design" in classes:
        shp["design"] = _fit_design(shp["design"], device)
    dtypes = args.dtypes or (list(DTYPES) if on_gpu else ["float32", "float16"])
    if not on_gpu and (args.dtypes is None or "bfloat16" in dtypes):
        dtypes = [d for d in dtypes if d != "bfloat16"]
        not_checked.append("bfloat16 off GPU: the Triton interpreter multiplies bfloat16 dot operands as raw bits "
                           "(triton-lang/triton#11584)")

    # which kernel backends can run here, and how
    runners: Dict[str, Callable] = {}
    where = {"triton": "gpu" if on_gpu else "triton interpreter", "cuda": "gpu" if on_gpu else "csrc host emulator"}

    triton_ok = triton_backend.is_available(device) and interp_reason is None
    if triton_ok:
        runners["triton"] = contextlib.nullcontext
    else:
        not_checked.append("backend triton: " + (interp_reason or "the triton package is not installed"))
    if on_gpu:
        from .cuda_build import unavailable_reason

        why = unavailable_reason(device)
        if why is None:
            runners["cuda"] = contextlib.nullcontext
        else:
            not_checked.append(f"backend cuda: {why}")
    elif not triton_ok:
        not_checked.append("backend cuda (host emulator): its forward and backward run the triton kernels, "
                           "which cannot run here")
    else:
        emu, why = load_emulator()
        if emu is None:
            not_checked.append(f"backend cuda: {why}")
        else:
            runners["cuda"] = lambda emu=emu: cuda_backend.use_kernels(emu.ops)

    checks: List[dict] = []

    def record(rec):
        checks.append(rec)
        line = f"{'ok  ' if rec['status'] == 'pass' else 'FAIL'} {rec['name']}"
        if rec.get("rel_err"):
            line += "  max rel err %.2g (tol %g)" % (max(rec["rel_err"].values()), rec["tolerance"])
        print(line, flush=True)
        if rec["status"] != "pass":
            print(f"     {rec['error']}", flush=True)

    if on_gpu and "cuda" in runners:
        rec = dict(name="cuda build (csrc/ with ninja)", kind="build", backend="cuda", dtype=None, status="pass",
                   error=None, rel_err={}, tolerance=None)
        try:
            cuda_backend.require(device)
        except Exception as exc:
            rec.update(status="fail", error=_error(exc))
            runners.pop("cuda")
        record(rec)

    print(f"routedlora self-test on {dev_info['name']} ({device.type}); shape classes {', '.join(classes)}; "
          f"dtypes {', '.join(dtypes)}", flush=True)
    for cls in classes:
        shape = shp[cls]
        for backend, ctx in runners.items():
            for dtype_name in dtypes:
                for combine, h in CASES:
                    if shape["d"] % h or shape["o"] % h:
                        continue
                    with ctx():
                        rec = check_op(backend, cls, shape, dtype_name, combine, h, device)
                    rec["ran_on"] = where[backend]
                    record(rec)
        for combine, h in CASES:
            if shape["d"] % h or shape["o"] % h:
                not_checked.append(f"{cls}: h={h} ({combine}) does not divide d={shape['d']} / o={shape['o']}")

    timings = {}
    if on_gpu:
        tdt = args.dtype
        h = args.heads if shp["model"]["d"] % args.heads == 0 and shp["model"]["o"] % args.heads == 0 else 1
        small = dict(shp["model"], tokens=8)  # the layer checks' weights; their inputs are fixed small batches
        for backend in list(runners):
            if any(c["backend"] == backend and c["status"] == "fail" for c in checks):
                not_checked.append(f"torch.compile / CUDA graph with {backend}: skipped, its op checks failed")
                continue
            record(check_compile(backend, small, h, tdt, device))
            record(check_cuda_graph(backend, small, h, tdt, device))
        if args.no_timing:
            not_checked.append("timings: --no-timing")
        for cls in ([] if args.no_timing else classes):
            passing = [b for b in runners if not any(c["backend"] == b and c["status"] == "fail" for c in checks)]
            shape = shp[cls]
            hh = h if shape["d"] % h == 0 and shape["o"] % h == 0 else 1
            timings[cls] = time_class(cls, shape, passing, hh, tdt, device, args.rounds)
            t = timings[cls]
            parts = ", ".join(f"{b} {v['median_ms']:.4g} ms" if v.get("median_ms") is not None else f"{b} error"
                              for b, v in t["backends"].items())
            base_ms = "error" if t["base_ms"] is None else f"{t['base_ms']:.4g} ms"
            print(f"time {cls} ({t['measures']}, {tdt}, h={hh}): base {base_ms}; {parts}; "
                  f"fastest {t['fastest']}", flush=True)

    failed = [c for c in checks if c["status"] == "fail"]
    report = dict(schema=backends.REPORT_SCHEMA, created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  command=" ".join(["python -m routedlora.selftest"] + list(args.argv or [])),
                  versions=versions(), device=dev_info, triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                  shape_classes={c: shp[c] for c in classes}, tolerance=TOLERANCE, checks=checks,
                  not_checked=not_checked, timings=timings,
                  fastest={c: t["fastest"] for c, t in timings.items()},
                  summary=dict(ran=len(checks), passed=len(checks) - len(failed), failed=len(failed)),
                  passed=not failed)
    return report


def write_report(report: dict, paths: List[Path]) -> List[Path]:
    written = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)  # auto in another process never reads half a report
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routedlora.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", action="append", choices=SHAPE_CLASSES,
                    help="shape class to check (repeat; default all: model, design, decode)")
    ap.add_argument("--d", type=int, help="model class: input features (GPU default 4096)")
    ap.add_argument("--o", type=int, help="model class: output features (default d)")
    ap.add_argument("--r", type=int, help="model class: rank (GPU default 16)")
    ap.add_argument("--m", type=int, help="model class: skills (GPU default 8)")
    ap.add_argument("--tokens", type=int, help="model class: tokens per batch (GPU default 4096)")
    ap.add_argument("--seq-len", type=int, help="model class: tokens per routing row (GPU default 256)")
    ap.add_argument("--dtypes", action="append", choices=DTYPES, help="dtypes to check (repeat; default all)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the timings and layer checks")
    ap.add_argument("--heads", type=int, default=4, help="heads of the timings and layer checks (default 4)")
    ap.add_argument("--rounds", type=int, default=10, help="timing rounds (default 10)")
    ap.add_argument("--no-timing", action="store_true", help="checks only (auto then stays on torch)")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is visible")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("d", "o", "r", "m", "tokens", "seq_len", "heads", "rounds"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    import torch

    if torch.cuda.is_available() and not args.cpu and os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 would run the triton kernels in the interpreter on this GPU: unset it "
                 "(or pass --cpu for the CPU mode)")
    t0 = time.perf_counter()
    report = run(args)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    from . import backends

    paths = [backends.report_path()] + ([args.json] if args.json else [])
    try:
        written = write_report(report, paths)
    except OSError as exc:
        print(f"could not write the report: {exc}", file=sys.stderr)
        written = []
    backends.reset_auto()
    s = report["summary"]
    print(f"\n{s['passed']}/{s['ran']} checks passed in {report['seconds']} s"
          + (f"; FAILED: {', '.join(c['name'] for c in report['checks'] if c['status'] == 'fail')}" if s["failed"] else ""))
    if report["fastest"]:
        print("fastest passing backend: " + ", ".join(f"{c} {b}" for c, b in report["fastest"].items()))
    if report["not_checked"]:
        print("not checked here:")
        for line in report["not_checked"]:
            print(f"  - {line}")
    for p in written:
        print(f"report: {p}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
