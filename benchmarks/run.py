"""routedlora's benchmark harness: routedlora side by side with what users would run instead.

    python -m benchmarks.run                        # detects the device, picks the profile
    python -m benchmarks.run --quick                # the base cases only
    python -m benchmarks.run --only layer,model     # any of: cost, layer, decode, grouping, model
    python -m benchmarks.run --only cost --out DIR  # exact counts + H100 projection: DIR/cost.{json,md,png}

Every comparison is made inside one run: per case, the implementations are timed in
interleaved rounds (rotated order) and each ratio is the median of same-round ratios with
its quartiles (``routedlora/timing.py``). On a CPU the thread count is pinned (default 1)
and a sanity line (an n-cube matmul's achieved GFLOP/s, at the start and the end) shows
whether the machine was loaded; numbers from different runs are not to be compared.

On a GPU (profile ``gpu``): layer sweeps around d=o=4096, r=16, m=8, h=4, 16k tokens,
64 tasks, bf16; decode-shaped calls; the routing-metadata kernel against torch's sort;
Llama-style models of ~100M and ~1B parameters. On a CPU (profile ``cpu``): the headline
layer cases (d=o=1024, r=16, m=8, 64 tasks, 64 sequences of 128 tokens and 2048 of 4,
h = 1 and 4), a sweep of tokens per routing row, small sweeps of the other axes, and a
tiny Llama (hidden 256, 4 layers, q/k/v/o, r=8, m=8, h=4, 8 sequences of 128 tokens): CPU
timings only, which say nothing about GPU speed. Writes ``<out>/<stem>.json``, ``.md`` and PNG plots.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
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

from . import cost, grouping_bench, layer_bench, model_bench  # noqa: E402
from .peers import LayerCase  # noqa: E402
from .report import write_all  # noqa: E402
from routedlora.timing import matmul_gflops  # noqa: E402

SUITES = ("cost", "layer", "decode", "grouping", "model")

GPU_LAYER_BASE = LayerCase(tokens=16384, tasks=64, heads=4, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16")
GPU_LAYER_AXES = {"tokens": [1, 8, 64, 512, 4096, 65536], "tasks": [1, 8, 256, 1024], "heads": [1, 16],
                  "skills": [4, 32, 64], "rank": [4, 64, 128], "d": [1024, 8192], "dtype": ["float16", "float32"]}
GPU_HEADLINE = [LayerCase(tokens=16384, tasks=64, heads=h, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16",
                          seq_len=s) for h in (1, 4) for s in (256, 4)]
CPU_LAYER_BASE = LayerCase(tokens=1024, tasks=8, heads=2, skills=4, rank=8, d=256, o=256, dtype="float32")
CPU_LAYER_AXES = {"tasks": [1, 64, 256, 1024], "heads": [1, 4], "skills": [16], "rank": [1, 32],
                  "dtype": ["bfloat16"]}
# DESIGN.md §2 / issue 10's layer targets on the CPU: PEFT Poly's overhead ÷ ours at 128 and 4
# tokens per sequence, one head and four
CPU_HEADLINE = [LayerCase(tokens=8192, tasks=64, heads=h, skills=8, rank=16, d=1024, o=1024, dtype="float32",
                          seq_len=s) for h in (1, 4) for s in (128, 4)]
# where row-mixed hands over to rank space: tokens per routing row at a fixed token count
TOKENS_PER_ROW = [1, 2, 4, 8, 16, 64, 256]
GPU_ROW_SWEEP = [LayerCase(tokens=16384, tasks=64, heads=4, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16",
                           seq_len=s) for s in TOKENS_PER_ROW]
CPU_ROW_SWEEP = [LayerCase(tokens=4096, tasks=64, heads=4, skills=8, rank=8, d=256, o=256, dtype="float32",
                           seq_len=s) for s in TOKENS_PER_ROW]

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
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
CPU_MODELS = [
    # 128 tokens per sequence: the short end of DESIGN.md's training rows (S = 128 … 4096)
    model_bench.ModelCase("llama-tiny", 256, 512, 4, 4, 4, 512, batch=8, seq=128, new_tokens=16, tasks=8, skills=8,
                          rank=8, route_heads=4, dtype="float32", targets=ATTENTION),
]

CPU_NOTE = ("CPU TIMINGS: measured on the CPU with the backends that exist here; they say nothing about GPU "
            "speed. Ratios are medians of same-round ratios from this one run (quartiles in brackets); do not "
            "compare numbers across runs. routedlora[triton-interpreter] rows only show that the Triton kernels "
            "run (in Triton's interpreter, on the small cases); they are not timed.")


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
        note = "GPU timings with CUDA events; medians of same-round ratios, interleaved rounds."
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        note = CPU_NOTE
    return {"device_name": name, "device": str(device), "profile": profile, "note": note,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "peft": _version("peft"), "transformers": _version("transformers"),
            "python": platform.python_version(), "git_commit": commit,
            "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _layer_cases(base: LayerCase, axes: dict, headline, row_sweep, quick: bool):
    """``(axis, case)``: the base case, the headline cases, the tokens-per-row sweep, then one field of the
    base varied at a time."""
    cases = [("base", base)]
    if quick:
        return cases
    cases += [("headline", c) for c in headline] + [("tokens_per_row", c) for c in row_sweep]
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


def _suites(only: str):
    if only is None:
        return set(SUITES)
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    unknown = wanted - set(SUITES)
    if unknown or not wanted:
        raise SystemExit(f"--only: expected a comma-separated list of {', '.join(SUITES)}; got {only!r}")
    return wanted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="base cases only")
    p.add_argument("--only", help="comma-separated suites to run: " + ", ".join(SUITES))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on a CPU, so peers do not fight over cores)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison (default 7 CPU, 15 GPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    wanted = _suites(args.only)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.threads is not None or not gpu:
        torch.set_num_threads(max(1, args.threads or 1))
    profile = "gpu" if gpu else "cpu"
    env = environment(device, profile)
    print(f"routedlora benchmark on {env['device_name']} (profile {profile}{', quick' if args.quick else ''})")
    if not gpu:
        print(CPU_NOTE)
    env["sanity_gflops_start"] = matmul_gflops(device, torch.bfloat16 if gpu else torch.float32)
    print(f"sanity: a 512-cube matmul runs at {env['sanity_gflops_start']:.0f} GFLOP/s here and now")
    base = GPU_LAYER_BASE if gpu else CPU_LAYER_BASE
    cases = (_layer_cases(base, GPU_LAYER_AXES if gpu else CPU_LAYER_AXES, GPU_HEADLINE if gpu else CPU_HEADLINE,
                          GPU_ROW_SWEEP if gpu else CPU_ROW_SWEEP, args.quick) if "layer" in wanted else [])
    decode = (GPU_DECODE if gpu else CPU_DECODE) if "decode" in wanted and not args.quick else []
    grouping = "grouping" in wanted and not args.quick
    models = (GPU_MODELS if gpu else CPU_MODELS)[: 1 if args.quick else None] if "model" in wanted else []
    rounds = args.rounds or (15 if gpu else (3 if args.quick else 7))
    timing = dict(rounds=rounds, min_sample_s=0.005 if gpu else 0.02, max_seconds=60.0 if gpu else 30.0)

    from tqdm import tqdm

    counted = "cost" in wanted and not args.quick
    total = (len(cases) * len(layer_bench.MODES) + len(decode) + (grouping_bench.n_runs(device) if grouping else 0)
             + len(models) * 2 + (cost.n_runs() if counted else 0))
    rows = []
    t0 = time.time()
    cost_result = None
    with tqdm(total=total, unit="case", dynamic_ncols=True) as bar:
        # the model suite first: a training job does not follow hundreds of MB of differently sized
        # layer-sweep buffers, whose leftover heap slows the next small allocations unevenly by peer
        for mc in models:
            bar.set_description(f"model {mc.name}")
            rows += model_bench.run_case(mc, device, progress=bar, **timing)
        for axis, case in cases:
            bar.set_description(f"layer N={case.tokens} T={case.tasks} h={case.heads} m={case.skills} "
                                f"r={case.rank} d={case.d} {case.dtype}")
            rows += layer_bench.run_case(case, device, seq_len=256 if gpu else 64, axis=axis, progress=bar, **timing)
        for case in decode:
            bar.set_description(f"decode N={case.tokens} T={case.tasks} h={case.heads}")
            rows += layer_bench.run_case(case, device, seq_len=1, axis="decode", progress=bar, modes=("fwd",),
                                         **timing)
        if grouping:
            bar.set_description("routing metadata")
            rows += grouping_bench.run(device, progress=bar, **timing)
        if counted:  # counts, not timings: last, so its full-size buffers do not precede any timing
            bar.set_description("cost: exact counts at full size")
            cost_result = cost.run(progress=bar)
        bar.n = total
        bar.refresh()
    env["sanity_gflops_end"] = matmul_gflops(device, torch.bfloat16 if gpu else torch.float32)
    result = {"env": env, "base_case": base.as_dict(), "rows": rows, "seconds": time.time() - t0}
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")[:40]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = write_all(result, Path(args.out) / f"{stamp}-{profile}-{slug}") if rows else []
    if cost_result is not None:
        paths += cost.write(cost_result, Path(args.out), env["command"])
        print("\n" + cost.markdown(cost_result, env["command"]))
    _summary(rows, env)
    print(f"\nwrote {len(rows)} timing rows in {result['seconds']:.0f}s:")
    for path in paths:
        print(f"  {path}")
    if not gpu:
        print(CPU_NOTE)
    return 0


def _iqr(r: dict, key: str, spec: str = ".2f") -> str:
    if r.get(key) is None:
        return "—"
    lo, hi = r.get(key + "_q1"), r.get(key + "_q3")
    return format(r[key], spec) + ("" if lo is None else f" [{format(lo, spec)}, {format(hi, spec)}]")


def _summary(rows, env) -> None:
    print(f"\nsanity: {env['sanity_gflops_start']:.0f} GFLOP/s at the start, {env['sanity_gflops_end']:.0f} at the end")
    layer = [r for r in rows if r["level"] == "layer" and "median_ms" in r and r.get("axis") in ("base", "headline")]
    if layer:
        print("\nlayer (medians of same-round ratios [quartiles]):")
        print(f"{'case':34} {'mode':8} {'peer':22} {'ms':>9} {'overhead':>20} {'PEFT Poly ov / ov':>20}")
        for r in layer:
            case = f"N={r['tokens']}={r['seqs']}x{r['positions']} h={r['heads']} d={r['d']} {r['dtype']}"
            print(f"{case:34} {r['mode']:8} {r['peer']:22} {r['median_ms']:9.3f} {_iqr(r, 'overhead', '+.2f'):>20} "
                  f"{_iqr(r, 'peft_poly_overhead_ratio'):>20}")
    decode = [r for r in rows if r.get("axis") == "decode" and "median_ms" in r]
    if decode:
        print("\ndecode latency (forward, one position per sequence): ms, overhead over the base")
        for r in decode:
            print(f"  N={r['tokens']:<3} T={r['tasks']:<3} h={r['heads']} {r['peer']:30} {r['median_ms']:9.4f} ms "
                  + _iqr(r, "overhead", "+.2f"))
    for r in (r for r in rows if r["level"] == "grouping" and "median_ms" in r):
        print(f"grouping {r['pattern']:12} N={r['tokens']:<6} {r['peer']:30} {r['median_ms']:9.4f} ms"
              + ("" if r.get("x_torch") is None else f"  x{r['x_torch']:.2f} torch"))
    model = [r for r in rows if r["level"] == "model" and "tokens_per_s" in r]
    if model:
        print("\nmodel (speed = same-round time ratio, > 1 is faster):")
    for r in model:
        print(f"{r['name']:12} {r['mode']:8} {r['peer']:22} {r['tokens_per_s']:10.0f} tok/s  "
              f"vs PEFT Poly {_iqr(r, 'speed_vs_peft_poly'):>20}  vs PEFT LoRA {_iqr(r, 'speed_vs_peft_lora'):>20}")


if __name__ == "__main__":
    raise SystemExit(main())
