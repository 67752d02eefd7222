"""Layer level: one routed nn.Linear replacement against its peers, forward and forward+backward."""
from __future__ import annotations

from typing import List

import torch

from .peers import REFERENCE, SAME_FUNCTION, LayerCase, LayerInputs, by_mode, layer_peers
from .timing import measure, peak_memory_mb

MODES = ("fwd", "fwd+bwd")


def _runner(peer, inp: LayerInputs, mode: str):
    x = inp.x
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return peer(x)
        return run
    x = x.detach().requires_grad_(True)
    cot = torch.randn(inp.seqs, inp.pos, inp.case.o, device=inp.device, dtype=inp.dtype)

    def run():
        peer(x).backward(cot)
    return run


def _set_mode(peer, training: bool) -> None:
    if isinstance(peer, torch.nn.Module):
        peer.train(training)
    else:  # closures over a layer: find it through the closure cells
        for cell in getattr(peer, "__closure__", None) or ():
            if isinstance(cell.cell_contents, torch.nn.Module):
                cell.cell_contents.train(training)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def run_case(case: LayerCase, device: torch.device, *, seq_len: int, warmup: int, reps: int,
             max_seconds: float, axis: str = "base", peers_wanted=None, progress=None,
             modes=MODES) -> List[dict]:
    """Every peer on one case; ``axis`` names the swept field this case varies (for the plots).

    ``modes``: ``("fwd",)`` for decode latency (no autograd), or both modes.
    """
    inp = LayerInputs(case, device, seq_len)
    peers = layer_peers(device, case)
    if peers_wanted:
        peers = {k: v for k, v in peers.items() if k in peers_wanted or k == "base"}
    built, errors = {}, {}
    for name, build in peers.items():
        try:
            built[name] = build(inp)
        except Exception as e:  # a peer this torch/peft cannot build is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
    ref = None
    if REFERENCE in built:
        _set_mode(built[REFERENCE], False)
        with torch.no_grad():
            ref = built[REFERENCE](inp.x)
    rows = []
    for name, peer in built.items():
        rel_err = None
        if ref is not None and name in SAME_FUNCTION:
            _set_mode(peer, False)
            try:
                with torch.no_grad():
                    rel_err = _rel_err(peer(inp.x), ref)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                continue
        for mode in modes:
            _set_mode(peer, mode != "fwd")
            row = dict(level="layer", peer=name, mode=mode, axis=axis, **case.as_dict(), seqs=inp.seqs,
                       positions=inp.pos, rel_err_vs_reference=rel_err)
            # interpreted kernels: one run shows the path works; more would only cost minutes
            interp = "interpreter" in name
            try:
                run = _runner(peer, inp, mode)
                row.update(measure(run, device, warmup=0 if interp else warmup, reps=1 if interp else reps,
                                   max_seconds=max_seconds))
                row["peak_mem_mb"] = peak_memory_mb(run, device)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            if progress is not None:
                progress.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, err in errors.items():
        rows.append(dict(level="layer", peer=name, mode="-", axis=axis, **case.as_dict(), error=err))
    add_ratios(rows)
    return rows


def add_ratios(rows: List[dict]) -> None:
    """Ratios to the frozen base and to PEFT Poly, and overhead over the base, per mode."""
    times = by_mode(rows, "median_ms")
    for r in rows:
        t = r.get("median_ms")
        if t is None:
            continue
        base = times[r["mode"]].get("base")
        poly = times[r["mode"]].get("peft_poly")
        r["x_base"] = t / base if base else None
        r["overhead"] = (t - base) / base if base else None
        r["x_peft_poly"] = t / poly if poly else None
