"""Exact costs of one routed linear and an H100 roofline projection, counted on a CPU in seconds.

    python -m benchmarks.run --only cost --out DIR     # writes DIR/cost.json, cost.md, cost.png

For each implementation, case (``design``: bf16, d=o=4096, r=16, m=8, 64 tasks, 64 sequences of
256 tokens; ``decode``: bf16, 8 sequences of 1 token, 8 tasks, same layer; ``mlp`` and
``mlp-decode``: the same at o=11008, a base weight larger than L2, with 64 sequences of 256 tokens
and 64 sequences of 1 token, 64 tasks), heads (1, 4) and
pass (``fwd``: evaluation, no autograd; ``fwd+bwd``: training, Gumbel noise on), the whole
layer is run at full size under :class:`benchmarks.counting.CountingMode`, base GEMM included,
and gives:

* ``launches``: kernels (ops that are neither views nor allocations), ``host_syncs``;
* ``flops`` (``torch.utils.flop_counter``'s formulas) and ``bytes`` (input + output bytes per op);
* ``saved_bytes``: what autograd keeps for backward, parameters excluded (``fwd+bwd`` rows);
* ``projected_ms = Σ_kernels max(flops / peak, bytes / HBM bandwidth) + launches × launch``
  on the H100 model in ``device_model``, and ``projected_overhead`` = (projected − base's) /
  base's for the same case, heads and pass.

Each kernel is priced as reading its inputs from and writing its outputs to HBM: a separate op
cannot keep a tensor in L2 for the next (50 MB is less than one 16k × 4096 bf16 activation).
It is a projection from counts, not a measurement; the counts themselves are exact for the
code as it dispatches on this torch version. Task-id validation and the batch's routing metadata
(token rows, their grouping by row, the rows' grouping by task) happen once per batch and are shared
by every routed layer of a model: they are built before the layer is counted, and their own counts
are in each routedlora row's ``per_batch``.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Dict, List

import torch

from routedlora.ops import plan
from routedlora.ops.plan import H100
from routedlora.ops.tile_order import H100_L2_BYTES, H100_SMS  # waves and L2 of the device model

from .counting import saved_bytes
from .peers import LayerCase, LayerInputs, layer_peers, routedlora_peer

DEVICE_MODEL = {
    "name": "NVIDIA H100 SXM5 80GB",
    "hbm_bandwidth_bytes_per_s": H100.read_bw,
    "peak_flops_per_s": {"bfloat16": H100.peak(2), "float16": H100.peak(2), "float32": H100.peak(4)},
    "l2_bytes": H100_L2_BYTES,
    "l2_bandwidth_bytes_per_s": 5.5e12,
    "launch_s": 3e-6,
    "sources": "HBM3 3.35 TB/s, 989 dense bf16/fp16 tensor TFLOP/s, 67 fp32 TFLOP/s (non-tensor), 50 MB L2: NVIDIA "
               "H100 datasheet. L2 ~5.5 TB/s: third-party microbenchmarks (not used: no kernel here keeps a tensor "
               "in L2). 3 µs per launch: an assumed back-to-back launch cost from one host thread, without CUDA "
               "graphs.",
    "kind": "projection, not a measurement",
}

# routedlora[cuda] runs the triton kernels on these cases (its own kernel groups token-level rows)
IMPLS = ("base", "peft_lora", "peft_poly", "per_task_loop", "routedlora[torch]", "routedlora[triton]")


def hbm_bytes(traffic) -> float:
    """A kernel's main-memory traffic: each argument's distinct bytes if it fits in L2, else every
    request (a tensor re-read by many programs is re-read from HBM once L2 cannot hold it).

    The arguments a (token tile, column) grid streams (the fused expand's x rows and base-weight
    panels, ``traffic.order``) follow that order's wave rule instead
    (``routedlora.ops.tile_order.TileOrder.hbm_bytes``), with the re-read arguments that fit in L2
    resident beside them."""
    l2 = DEVICE_MODEL["l2_bytes"]
    order = getattr(traffic, "order", None)
    streamed = set(order.by_tile) | set(order.by_col) if order is not None else set()
    resident = sum(d for a, d in traffic.distinct.items()
                   if a not in streamed and d <= l2 and traffic.requested.get(a, 0) > d)
    waves = order.hbm_bytes(l2, H100_SMS, resident) if order is not None else {}
    total = 0.0
    for a, d in traffic.distinct.items():
        if a in waves:
            total += waves[a]
        else:
            total += d if d <= l2 else traffic.requested.get(a, 0)
    return float(total)


def _priced(traffic):
    """A recorded launch (a launcher's traffic formula) as a counted kernel."""
    from .counting import Kernel

    dtype = traffic.variant.get("dtype", "torch.float32").replace("torch.", "")
    return Kernel(traffic.kernel, float(traffic.flops), hbm_bytes(traffic), dtype,
                  detail=dict(grid=list(traffic.grid), requested=traffic.requested, distinct=traffic.distinct,
                              variant=traffic.variant))


def _triton_expansions() -> Dict[object, Callable]:
    """The triton backend's custom ops, counted by their bodies with the kernel launches recorded."""
    from routedlora.ops import triton_backend as tb

    def expander(op):
        def run(mode, *args, **kwargs):
            with tb.record_launches() as launches:
                out = op._init_fn(*args, **kwargs)
            mode.counts.kernels.extend(_priced(t) for t in launches)
            return out
        return run

    ops = (tb._forward_op, tb._backward_op, tb._route_op, tb._route_backward_op)
    return {op._opoverload: expander(op) for op in ops}
PASSES = ("fwd", "fwd+bwd")


def cases(heads=(1, 4)) -> Dict[str, List[LayerCase]]:
    return {
        "design": [LayerCase(tokens=16384, tasks=64, heads=h, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16",
                             seq_len=256) for h in heads],
        "decode": [LayerCase(tokens=8, tasks=8, heads=h, skills=8, rank=16, d=4096, o=4096, dtype="bfloat16",
                             seq_len=1) for h in heads],
        # a feed-forward projection whose base weight (90 MB) does not fit in L2: a Llama-7B gate/up_proj
        "mlp": [LayerCase(tokens=16384, tasks=64, heads=h, skills=8, rank=16, d=4096, o=11008, dtype="bfloat16",
                          seq_len=256) for h in heads],
        "mlp-decode": [LayerCase(tokens=64, tasks=64, heads=h, skills=8, rank=16, d=4096, o=11008,
                                 dtype="bfloat16", seq_len=1) for h in heads],
    }


def grid_fill(kernel) -> float:
    """The share of the GPU a launch's grid occupies: a custom kernel of P < 132 programs is priced at
    P/132 of the bandwidth and peak (conservative: one program per SM, an SM pulling no more than
    its share). Library kernels (torch's, cuBLAS) are assumed to fill the GPU."""
    grid = (kernel.detail or {}).get("grid")
    return min(1.0, math.prod(grid) / H100_SMS) if grid else 1.0


def projected_s(kernels) -> float:
    bw = DEVICE_MODEL["hbm_bandwidth_bytes_per_s"]
    peaks = DEVICE_MODEL["peak_flops_per_s"]
    return sum(max(k.flops / peaks.get(k.dtype, peaks["float32"]), k.bytes / bw) / max(grid_fill(k), 1e-9)
               + DEVICE_MODEL["launch_s"] for k in kernels)


@contextlib.contextmanager
def _routed_call(peer, inp: LayerInputs, counted: Callable):
    """routedlora's layer as a model runs it: inside one routing block (ids checked at its entry),
    with the batch's routing metadata, which every routed layer of a model shares, built first.
    Yields the layer call and the counts of that per-batch build (``counted(fn)`` counts ``fn``)."""
    import routedlora
    from routedlora.backends import resolve_backend

    layer = _module(peer)
    with routedlora.routing(layer, inp.task_ids) as state:
        def build():
            batch = state.rows_for(inp.x.shape[:-1])
            backend = resolve_backend(layer.config.backend, inp.x.device)
            algo = backend.plan(inp.x.view(-1, inp.x.shape[-1]), layer.lora_A, layer.lora_B, None, batch.tokens,
                                layer.config.combine, True)
            if algo.NEEDS_ROUTE_IDS:
                batch.tokens.route_ids
            if algo.NEEDS_GROUPING:
                algo.grouping(batch.tokens)
            if layer.config.backend in ("triton", "cuda"):
                batch.by_task(layer.n_tasks).grouping()
        per_batch = counted(build)
        yield layer, per_batch


def _module(peer):
    if isinstance(peer, torch.nn.Module):
        return peer
    return next(c.cell_contents for c in peer.__closure__ if isinstance(c.cell_contents, torch.nn.Module))


def count_impl(name: str, inp: LayerInputs, peer, pass_: str) -> dict:
    with plan.assume_device("cuda"):  # routedlora[torch] picks its algorithm as on the projected GPU
        return _count_layer(name, inp, peer, pass_)


def _count_layer(name: str, inp: LayerInputs, peer, pass_: str) -> dict:
    module = _module(peer)
    expand = _triton_expansions() if name == "routedlora[triton]" else None

    def count(fn):
        from .counting import CountingMode

        with CountingMode(expand=expand) as mode:
            fn()
        return mode.counts
    with contextlib.ExitStack() as stack:
        per_batch = None
        if name.startswith("routedlora"):
            layer, per_batch = stack.enter_context(_routed_call(peer, inp, count))
            call = layer
            if pass_ == "fwd" and inp.case.seq_len == 1:
                # a decode step of a generate loop: the previous step built the batch and, at
                # inference, each layer's routing weights, which every later step reuses (that
                # step is counted too, kernels recorded not launched, and its counts dropped)
                def previous_step():
                    layer.eval()
                    with torch.no_grad():
                        layer(inp.x)
                count(previous_step)
        else:
            call = peer
        row = _count_passes(module, call, inp, pass_, count)
    if per_batch is not None:
        row["per_batch"] = dict(launches=per_batch.launches, bytes=per_batch.bytes,
                                kernels=[k.name for k in per_batch.kernels])
    return row


def _count_passes(module, call, inp: LayerInputs, pass_: str, count) -> dict:
    params = [p for p in module.parameters()]
    if pass_ == "fwd":
        module.eval()

        def run():
            with torch.no_grad():
                call(inp.x)
        counts, saved = count(run), 0
    else:
        module.train()
        x = inp.x.detach().requires_grad_(True)
        cot = torch.empty(inp.seqs, inp.pos, inp.case.o, dtype=inp.dtype)
        holder = {}

        def fwd():
            holder["y"] = call(x)

        counts = count(lambda: (fwd(), holder["y"].backward(cot)))
        x.grad = None
        saved = saved_bytes(lambda: count(fwd), exclude=params)
        holder.clear()
    for p in params:
        p.grad = None
    return dict(launches=counts.launches, host_syncs=counts.host_syncs, flops=counts.flops, bytes=counts.bytes,
                saved_bytes=saved, projected_ms=projected_s(counts.kernels) * 1e3,
                kernels=[[k.name, k.flops, k.bytes] + ([k.detail] if k.detail else []) for k in counts.kernels])


def _spec(variant: dict, kernel: str) -> dict:
    consts = {k: v for k, v in variant.items() if k not in ("dtype", "num_warps", "num_stages")}
    return dict(kernel=kernel, dtype=variant["dtype"].replace("torch.", ""), constexprs=consts,
                num_warps=variant["num_warps"], num_stages=variant["num_stages"])


def triton_resources(specs: List[dict]) -> Dict[str, dict]:
    """Registers, spills, shared memory and occupancy on sm_90 of each launch variant, by spec.

    Compiled with the ptxas in the triton wheel, in a process without Triton's interpreter,
    and cached under ``$ROUTEDLORA_CACHE_DIR`` per triton version and kernel source.
    """
    import hashlib
    import os
    import subprocess
    import sys
    import tempfile

    import triton

    from routedlora import triton_kernels
    from routedlora.cuda_build import cache_root

    src = Path(triton_kernels.__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(src.glob("*.py")))).hexdigest()[:16]
    cache = cache_root() / f"triton-resources-{triton.__version__}-{digest}.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    keys = [json.dumps(s, sort_keys=True) for s in specs]
    todo = [s for s, k in zip(specs, keys) if k not in known]
    if todo:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(todo, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        out = subprocess.run([sys.executable, "-m", "routedlora.triton_kernels.compile_check", "--resources", f.name],
                             capture_output=True, text=True, env=env)
        os.unlink(f.name)
        if out.returncode != 0:
            raise RuntimeError(f"compile_check --resources failed: {out.stderr.strip().splitlines()[-1:]}")
        for spec, res in zip(todo, json.loads(out.stdout.strip().splitlines()[-1])):
            known[json.dumps(spec, sort_keys=True)] = res
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    return {k: known[k] for k in keys}


def _attach_resources(rows: List[dict]) -> None:
    """Add each Triton kernel's sm_90 resources to its detail, and the worst of them to its row."""
    kernels = [k for r in rows for k in r.get("kernels", ()) if len(k) > 3]
    specs = {json.dumps(_spec(k[3]["variant"], k[0]), sort_keys=True): _spec(k[3]["variant"], k[0])
             for k in kernels}
    found, error = {}, None
    try:
        found.update(triton_resources(list(specs.values())) if specs else {})
    except Exception as e:  # no compiler here: the counts stand without the resources
        error = f"triton: {type(e).__name__}: {e}"

    def key_of(k):
        return json.dumps(_spec(k[3]["variant"], k[0]), sort_keys=True)

    for r in rows:
        mine = [k for k in r.get("kernels", ()) if len(k) > 3 and key_of(k) in found]
        if error and any(len(k) > 3 for k in r.get("kernels", ())):
            r["resources_error"] = error
        for k in mine:
            k[3]["resources"] = found[key_of(k)]
        if mine:
            res = [k[3]["resources"] for k in mine]
            r["max_registers"] = max(x["registers"] for x in res)
            r["spill_bytes"] = max(x["spill_bytes"] for x in res)
            r["min_occupancy"] = min(x["occupancy"] for x in res)


def run(progress=None, impls=IMPLS, heads=(1, 4), resources: bool = True) -> dict:
    device = torch.device("cpu")
    rows = []
    for case_name, case_list in cases(heads).items():
        for case in case_list:
            inp = LayerInputs(case, device, case.seq_len)
            peers = dict(layer_peers(device, case), **{"routedlora[triton]": routedlora_peer("triton")})
            for name in impls:
                if name not in peers:
                    continue
                peer = peers[name](inp)
                for pass_ in PASSES:
                    row = dict(impl=name, case=case_name, heads=case.heads, **{"pass": pass_})
                    try:
                        row.update(count_impl(name, inp, peer, pass_))
                    except Exception as e:  # reported in the table, not fatal
                        row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                if progress is not None:
                    progress.update(1)
            del inp
    _relative(rows)
    if resources:
        _attach_resources(rows)
    return {"device_model": DEVICE_MODEL, "rows": rows}


def _relative(rows: List[dict]) -> None:
    key = lambda r: (r["case"], r["heads"], r["pass"])  # noqa: E731
    base = {key(r): r for r in rows if r["impl"] == "base" and "projected_ms" in r}
    poly = {key(r): r for r in rows if r["impl"] == "peft_poly" and "projected_ms" in r}
    lora = {key(r): r for r in rows if r["impl"] == "peft_lora" and "projected_ms" in r}
    for r in rows:
        b, p, lo = base.get(key(r)), poly.get(key(r)), lora.get(key(r))
        if "projected_ms" not in r or b is None:
            continue
        r["projected_overhead"] = (r["projected_ms"] - b["projected_ms"]) / b["projected_ms"]
        r["adapter_flops"] = r["flops"] - b["flops"]
        r["adapter_launches"] = r["launches"] - b["launches"]
        if p is not None:
            poly_adapter = p["flops"] - b["flops"]
            r["adapter_flops_x_peft_poly"] = r["adapter_flops"] / poly_adapter if poly_adapter > 0 else None
            r["projected_x_peft_poly"] = r["projected_ms"] / p["projected_ms"]
            ov_p = p["projected_ms"] - b["projected_ms"]
            ov = r["projected_ms"] - b["projected_ms"]
            r["peft_poly_overhead_ratio"] = ov_p / ov if ov > 0 else None
        if lo is not None and lo.get("saved_bytes"):
            r["saved_x_peft_lora"] = r["saved_bytes"] / lo["saved_bytes"]


def n_runs(heads=(1, 4)) -> int:
    return len(cases(heads)) * len(heads) * len(IMPLS)


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(result: dict, command: str) -> str:
    dm = result["device_model"]
    lines = ["# Projected on an H100 (counted on a CPU; a projection, not a measurement)", "",
             f"- command: `{command}`",
             f"- device model: {dm['name']}: {dm['hbm_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s HBM, "
             f"{dm['peak_flops_per_s']['bfloat16'] / 1e12:.0f} bf16 TFLOP/s, {dm['launch_s'] * 1e6:.0f} µs per launch "
             f"({dm['sources']})",
             "- counts per layer call, base GEMM included; overhead = (projected − base's) / base's; "
             "adapter = this row minus the base's", "",
             "- Triton kernels: bytes from each launcher's traffic formula (an argument's distinct bytes if "
             "it fits in L2, else every request); registers, spills and occupancy of the launched variants "
             "compiled for sm_90 with ptxas (worst kernel of the row)", "",
             "| case | h | pass | impl | launches | syncs | GFLOP | adapter GFLOP (×PEFT Poly) | GB moved | "
             "saved MB (×PEFT LoRA) | projected ms | overhead | ×PEFT Poly | regs (spill B) / occupancy |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        head = f"| {r['case']} | {r['heads']} | {r['pass']} | {r['impl']} |"
        if "error" in r or "owed" in r:
            lines.append(head + f" {r.get('owed') or 'error: ' + r['error'][:80]} |" + " |" * 9)
            continue
        regs = "" if "max_registers" not in r else (f"{r['max_registers']} ({r['spill_bytes']}) / "
                                                    f"{r['min_occupancy']:.3f}")
        saved = "" if r["pass"] == "fwd" else (f"{r['saved_bytes'] / 2**20:.0f}"
                                               + (f" ({r['saved_x_peft_lora']:.2f})" if r.get("saved_x_peft_lora")
                                                  else ""))
        lines.append(head + f" {r['launches']} | {r['host_syncs']} | {r['flops'] / 1e9:.1f} | "
                     f"{_fmt(r.get('adapter_flops', 0) / 1e9, '.2f')} "
                     f"({_fmt(r.get('adapter_flops_x_peft_poly'), '.2f')}) | {r['bytes'] / 1e9:.2f} | {saved} | "
                     f"{r['projected_ms']:.3f} | {_fmt(r.get('projected_overhead'), '+.3f')} | "
                     f"{_fmt(r.get('projected_x_peft_poly'), '.2f')} | {regs} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "projected_overhead" in r and r["impl"] != "base"]
    groups = sorted({(r["case"], r["heads"], r["pass"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        vals = [next((r["projected_overhead"] for r in rows if (r["case"], r["heads"], r["pass"]) == g
                      and r["impl"] == impl), float("nan")) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c}\nh={h} {p}" for c, h, p in groups], fontsize=8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("projected overhead over the base (H100 model)")
    ax.set_title("Projected on an H100 from exact CPU counts — a projection, not a measurement", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, command: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "cost.json", out / "cost.md", out / "cost.png"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result, command))
    plot(result, paths[2])
    return paths
