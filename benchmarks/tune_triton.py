"""Tune the triton backend's tiles per shape class on this GPU and store them as data.

    python -m benchmarks.tune_triton                   # on a GPU: writes triton_kernels/configs/<gpu>.json
    python -m benchmarks.tune_triton --dry-run --out DIR   # CPU interpreter, tiny shapes: checks the tuner itself

For each shape class of ``triton_kernels/configs/default.json`` (decode, medium, train)
it times forward+backward of ``routed_lora`` at a representative token count for every
candidate tile configuration, drops candidates whose output differs from the torch
reference, and keeps the fastest. The launchers pick the file named after the GPU
(``torch.cuda.get_device_name``) at run time; without one they use the defaults.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import time
from pathlib import Path

import torch

REPRESENTATIVE_TOKENS = {"decode": 16, "medium": 1024, "train": 16384}
DRY_RUN_TOKENS = {"decode": 4, "medium": 24, "train": 40}


def candidates(dry_run: bool):
    if dry_run:
        return [dict(BLOCK_N=16, BLOCK_D=16, BLOCK_O=16, BLOCK_W=16, num_warps=1, num_stages=1),
                dict(BLOCK_N=16, BLOCK_D=32, BLOCK_O=32, BLOCK_W=32, num_warps=1, num_stages=1)]
    out = []
    for bn, bd, bo, bw, warps, stages in itertools.product([16, 32, 64, 128], [64, 128], [64, 128, 256], [64, 128],
                                                           [4, 8], [2, 3]):
        if bn == 128 and bo == 256 and warps == 4:
            continue  # 128x256 float32 accumulators spill at 4 warps
        out.append(dict(BLOCK_N=bn, BLOCK_D=bd, BLOCK_O=bo, BLOCK_W=bw, num_warps=warps, num_stages=stages))
    return out


def _problem(N, d, r, m, h, tasks, dtype, device, seed=0):
    from routedlora import routers

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    A = (torch.randn(h, m, d // h, r, generator=g) * (d // h) ** -0.5).to(device, dtype)
    B = (torch.randn(h, m, r, d // h, generator=g) * r ** -0.5).to(device, dtype)
    logits = torch.randn(tasks, h, m, generator=g).to(device)
    rt = routers.poly_route(logits)
    route_ids = torch.arange(N, device=device) * tasks // max(N, 1)  # contiguous runs, one per task
    return x, A, B, rt, route_ids


def _run(backend, x, A, B, rt, route_ids, cot):
    from routedlora.ops import routed_lora

    xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, A, B))
    w = rt.w.detach().requires_grad_(True)
    y = routed_lora(xs, As, Bs, rt.idx, w, route_ids, scale=1.0 / A.shape[-1], backend=backend, validate=False)
    y.backward(cot)
    return y.detach(), xs.grad, As.grad, Bs.grad, w.grad


def _time(fn, device, dry_run):
    if dry_run or device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tune(dry_run: bool, d: int, r: int, m: int, h: int, dtype: torch.dtype, log=print) -> dict:
    from routedlora.ops import triton_backend as tb

    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    base = tb.tile_table(None)
    tokens = DRY_RUN_TOKENS if dry_run else REPRESENTATIVE_TOKENS
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    classes = {}
    for cls, spec in base["classes"].items():
        N = tokens[cls]
        x, A, B, rt, route_ids = _problem(N, d, r, m, h, min(64, N), dtype, device)
        cot = torch.randn(N, d, device=device, dtype=dtype)
        ref = _run("torch", x, A, B, rt, route_ids, cot)
        best = None
        for cand in candidates(dry_run):
            with tb.tile_override(cand):
                try:
                    got = _run("triton", x, A, B, rt, route_ids, cot)
                except Exception as e:  # a candidate that does not fit (shared memory, registers) is skipped
                    log(f"{cls:7s} {cand} skipped: {type(e).__name__}")
                    continue
                errs = [float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                        for a, b in zip(got, ref)]
                if max(errs) > tol:
                    log(f"{cls:7s} {cand} rejected: relative error {max(errs):.1e}")
                    continue
                ms = _time(lambda: _run("triton", x, A, B, rt, route_ids, cot), device, dry_run)
            log(f"{cls:7s} N={N:6d} {cand} {ms:9.3f} ms")
            if best is None or ms < best[0]:
                best = (ms, cand)
        if best is None:
            raise RuntimeError(f"no candidate tile configuration worked for class {cls!r}")
        classes[cls] = {"max_tokens": spec["max_tokens"], **best[1], "tuned_ms": round(best[0], 4), "tokens": N}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "dry-run (interpreter)"
    return {"_doc": base["_doc"], "device": name,
            "tuned": {"date": dt.date.today().isoformat(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__, "shape": dict(d=d, o=d, r=r, m=m, h=h,
                                                                                 dtype=str(dtype)),
                      "metric": "median forward+backward ms of routed_lora (params combine)"},
            "classes": classes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, two candidates")
    p.add_argument("--out", help="folder for the JSON (default: the package's triton_kernels/configs)")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        d, r, m, h, dtype = 32, 2, 2, 1, torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("tuning needs a GPU; use --dry-run to check the tuner on the CPU")
        d, r, m, h, dtype = args.d, args.r, args.m, args.h, getattr(torch, args.dtype)
    from routedlora.ops import triton_backend as tb

    table = tune(args.dry_run, d, r, m, h, dtype)
    out_dir = Path(args.out) if args.out else Path(tb._config_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tb.device_slug(table['device'])}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
