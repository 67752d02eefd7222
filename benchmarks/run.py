"""routedlora's benchmark harness: routedlora side by side with what users would run instead.

    python -m benchmarks.run                  # detects the device, picks the profile
    python -m benchmarks.run --quick          # the base cases only
    python -m benchmarks.run --only layer     # or: --only model | decode | grouping

On a GPU (profile ``gpu``): layer sweeps around d=o=4096, r=16, m=8, h=4, 16k tokens,
64 tasks, bf16; decode-shaped calls (1, 8, 64 tokens of one position each, 1 and 64
tasks, forward only: decode latency); the routing-metadata kernel against torch's sort;
and Llama-style models of ~100M and ~1B parameters. On a CPU
(profile ``cpu``): small sizes, finishing in a few minutes, and every timing is a
CPU timing that says nothing about GPU speed. Writes ``<out>/<stem>.json``, ``.md``
and PNG plots.
"""
from __future__ import annotations

import argparse
import os
import datetime as dt
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The triton backend's CPU path is Triton's interpreter, chosen when triton is
    # first imported: set it before peft/transformers (which may import triton) load.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import grouping_bench, layer_bench, model_bench  # noqa: E402
from .peers import LayerCase  # noqa: E402
from .report import write_all  # noqa: E402

GPU_LAYER_BASE = LayerCase(tokens=16384, tasks=64, heads=4, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16")
GPU_LAYER_AXES = {"tokens": [1, 8, 64, 512, 4096, 65536], "tasks": [1, 8, 256, 1024], "heads": [1, 16],
                  "skills": [4, 32, 64], "rank": [4, 64, 128], "d": [1024, 8192], "dtype": ["float16", "float32"]}
CPU_LAYER_BASE = LayerCase(tokens=1024, tasks=8, heads=2, skills=4, rank=8, d=256, o=256, dtype="float32")
CPU_LAYER_AXES = {"tokens": [1, 8, 64, 256, 4096, 16384], "tasks": [1, 64, 256, 1024], "heads": [1, 4],
                  "skills": [16], "rank": [1, 32], "d": [512], "dtype": ["bfloat16"]}

# decode: every token its own sequence at one position (seq_len 1); tasks <= tokens
DECODE_POINTS = [(1, 1), (8, 1), (8, 8), (64, 1), (64, 64)]
GPU_DECODE = [LayerCase(tokens=t, tasks=k, heads=h, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16")
              for h in (1, 4) for t, k in DECODE_POINTS]
CPU_DECODE = [LayerCase(tokens=t, tasks=k, heads=1, skills=4, rank=8, d=128, o=128, dtype="float32")
              for t, k in DECODE_POINTS]

GPU_MODELS = [
    model_bench.ModelCase("llama-100m", 768, 2048, 12, 12, 12, 32000, batch=16, seq=512, new_tokens=32, tasks=64,
                          skills=8, rank=16, route_heads=4, dtype="bfloat16"),
    model_bench.ModelCase("llama-1b", 2048, 5632, 16, 16, 8, 32000, batch=8, seq=1024, new_tokens=32, tasks=64,
                          skills=8, rank=16, route_heads=4, dtype="bfloat16"),
]
CPU_MODELS = [
    model_bench.ModelCase("llama-tiny", 128, 256, 2, 4, 4, 512, batch=8, seq=64, new_tokens=8, tasks=8, skills=4,
                          rank=8, route_heads=2, dtype="float32"),
]

CPU_NOTE = ("CPU TIMINGS: measured on the CPU with the backends that exist here; they say nothing about GPU "
            "speed and no speed claim rests on them. routedlora[triton-interpreter] rows run the Triton kernels in "
            "Triton's interpreter on the small cases only: they show the path works; their times mean nothing.")


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def environment(device: torch.device, profile: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        note = "GPU timings with CUDA events, median of repeated runs after warm-up."
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        note = CPU_NOTE
    return {"device_name": name, "device": str(device), "profile": profile, "note": note,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "peft": _version("peft"), "transformers": _version("transformers"),
            "python": platform.python_version(), "git_commit": commit,
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _layer_cases(base: LayerCase, axes: dict, quick: bool):
    """``(axis, case)``: the base case, then one field varied at a time."""
    cases = [("base", base)]
    if quick:
        return cases
    for field, values in axes.items():
        for v in values:
            changes = {field: v}
            if field == "d":
                changes["o"] = v  # width: d = o
            if field == "tokens":
                changes["tasks"] = min(base.tasks, v)
            c = LayerCase(**{**base.as_dict(), **changes})
            if c.d % c.heads or c.o % c.heads or c.tasks > c.tokens or any(c == seen for _, seen in cases):
                continue
            cases.append((field, c))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="base cases only")
    p.add_argument("--only", choices=["layer", "decode", "grouping", "model"], help="run one suite only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    profile = "gpu" if gpu else "cpu"
    env = environment(device, profile)
    print(f"routedlora benchmark on {env['device_name']} (profile {profile}{', quick' if args.quick else ''})")
    if not gpu:
        print(CPU_NOTE)
    base = GPU_LAYER_BASE if gpu else CPU_LAYER_BASE
    wants = (lambda suite: args.only in (None, suite))
    cases = _layer_cases(base, GPU_LAYER_AXES if gpu else CPU_LAYER_AXES, args.quick) if wants("layer") else []
    decode = (GPU_DECODE if gpu else CPU_DECODE) if wants("decode") and not args.quick else []
    grouping = wants("grouping") and not args.quick
    models = (GPU_MODELS if gpu else CPU_MODELS)[: 1 if args.quick else None] if wants("model") else []
    timing = dict(warmup=5, reps=30, max_seconds=5.0) if gpu else dict(warmup=2, reps=10, max_seconds=2.0)

    from tqdm import tqdm

    total = (sum(len(layer_bench.layer_peers(device, c)) for _, c in cases) * len(layer_bench.MODES)
             + sum(len(layer_bench.layer_peers(device, c)) for c in decode)
             + (grouping_bench.n_runs(device) if grouping else 0)
             + len(models) * len(model_bench.model_peers(device)) * 2)
    rows = []
    t0 = time.time()
    with tqdm(total=total, unit="run", dynamic_ncols=True) as bar:
        for axis, case in cases:
            bar.set_description(f"layer N={case.tokens} T={case.tasks} h={case.heads} m={case.skills} "
                                f"r={case.rank} d={case.d} {case.dtype}")
            rows += layer_bench.run_case(case, device, seq_len=256 if gpu else 64, axis=axis, progress=bar,
                                         **timing)
        for case in decode:
            bar.set_description(f"decode N={case.tokens} T={case.tasks} h={case.heads}")
            rows += layer_bench.run_case(case, device, seq_len=1, axis="decode", progress=bar, modes=("fwd",),
                                         **timing)
        if grouping:
            bar.set_description("routing metadata")
            rows += grouping_bench.run(device, progress=bar, **timing)
        for mc in models:
            bar.set_description(f"model {mc.name}")
            rows += model_bench.run_case(mc, device, progress=bar, **timing)
        bar.n = total
        bar.refresh()
    result = {"env": env, "base_case": base.as_dict(), "rows": rows, "seconds": time.time() - t0}
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")[:40]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = write_all(result, Path(args.out) / f"{stamp}-{profile}-{slug}")
    _summary(rows, base)
    print(f"\nwrote {len(rows)} rows in {result['seconds']:.0f}s:")
    for path in paths:
        print(f"  {path}")
    if not gpu:
        print(CPU_NOTE)
    return 0


def _summary(rows, base: LayerCase) -> None:
    head = [r for r in rows if r["level"] == "layer" and "median_ms" in r and r.get("axis") != "decode"
            and all(r[k] == v for k, v in base.as_dict().items())]
    if head:
        print(f"\nbase case: N={base.tokens} tokens, {base.tasks} tasks, h={base.heads}, m={base.skills}, "
              f"r={base.rank}, d=o={base.d}, {base.dtype}")
        print(f"{'peer':22} {'mode':8} {'ms':>10} {'overhead':>9} {'xPEFTPoly':>9}")
        for r in head:
            ov = "—" if r.get("overhead") is None else f"{r['overhead']:+.2f}"
            xp = "—" if r.get("x_peft_poly") is None else f"{r['x_peft_poly']:.2f}"
            print(f"{r['peer']:22} {r['mode']:8} {r['median_ms']:10.3f} {ov:>9} {xp:>9}")
    decode = [r for r in rows if r.get("axis") == "decode" and "median_ms" in r]
    if decode:
        print("\ndecode latency (forward, one position per sequence): ms, overhead over the base")
        for r in decode:
            print(f"  N={r['tokens']:<3} T={r['tasks']:<3} h={r['heads']} {r['peer']:30} {r['median_ms']:9.4f} ms "
                  + ("" if r.get("overhead") is None else f"{r['overhead']:+.2f}"))
    for r in (r for r in rows if r["level"] == "grouping" and "median_ms" in r):
        print(f"grouping {r['pattern']:12} N={r['tokens']:<6} {r['peer']:30} {r['median_ms']:9.4f} ms"
              + ("" if r.get("x_torch") is None else f"  x{r['x_torch']:.2f} torch"))
    model = [r for r in rows if r["level"] == "model" and "tokens_per_s" in r]
    for r in model:
        vs = r.get("speed_vs_peft_poly")
        print(f"{r['name']:12} {r['mode']:8} {r['peer']:22} {r['tokens_per_s']:10.0f} tok/s"
              + ("" if vs is None else f"  x{vs:.2f} PEFT Poly"))


if __name__ == "__main__":
    raise SystemExit(main())
