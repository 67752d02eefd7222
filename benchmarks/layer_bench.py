"""Layer level: one routed nn.Linear replacement against its peers, forward and forward+backward.

Per case and mode every peer runs in the same rounds (:func:`routedlora.timing.interleaved`),
so each ratio below is a median over rounds of same-round ratios, with its quartiles:

* ``overhead`` = (t − t_base) / t_base, the frozen base linear being the floor;
* ``x_peft_poly`` = t / t_PEFT Poly;
* ``peft_poly_overhead_ratio`` = PEFT Poly's overhead ÷ this peer's (DESIGN.md §2's target: ≥ 1).
"""
from __future__ import annotations

from typing import List

import torch

from .peers import REFERENCE, SAME_FUNCTION, LayerCase, LayerInputs, layer_peers, torch_algorithm
from routedlora.timing import Interleaved, interleaved, peak_memory_mb, quartiles

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


def ratios(res: Interleaved, name: str, base: str = "base", poly: str = "peft_poly") -> dict:
    """Same-round ratios of ``name`` against the base and PEFT Poly: medians and quartiles."""
    t, out = res.times[name], {}
    if base in res.times:
        b = res.times[base]
        x_base = quartiles([a / c for a, c in zip(t, b)])
        out.update(x_base=x_base[1], overhead=x_base[1] - 1, overhead_q1=x_base[0] - 1, overhead_q3=x_base[2] - 1)
        if poly in res.times and name not in (base, poly):
            per_round = [(p - c) / (a - c) for a, c, p in zip(t, b, res.times[poly]) if a != c]
            if per_round:
                q = quartiles(per_round)
                out.update(peft_poly_overhead_ratio=q[1], peft_poly_overhead_ratio_q1=q[0],
                           peft_poly_overhead_ratio_q3=q[2])
    if poly in res.times:
        q = quartiles([a / p for a, p in zip(t, res.times[poly])])
        out.update(x_peft_poly=q[1], x_peft_poly_q1=q[0], x_peft_poly_q3=q[2])
    return out


def run_case(case: LayerCase, device: torch.device, *, seq_len: int, rounds: int, min_sample_s: float,
             max_seconds: float, axis: str = "base", peers_wanted=None, progress=None, modes=MODES) -> List[dict]:
    """Every peer on one case; ``axis`` names the swept field this case varies (for the plots).

    ``modes``: ``("fwd",)`` for decode latency (no autograd), or both modes. Peers running in
    Triton's interpreter are run once to show the path works and are not timed.
    """
    inp = LayerInputs(case, device, seq_len)
    peers = layer_peers(device, case)
    if peers_wanted:
        peers = {k: v for k, v in peers.items() if k in peers_wanted or k in ("base", "peft_poly")}
    built, errors = {}, {}
    for name, build in peers.items():
        try:
            built[name] = build(inp)
        except Exception as e:  # a peer this torch/peft cannot build is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
    ref, rel = None, {}
    if REFERENCE in built:
        _set_mode(built[REFERENCE], False)
        with torch.no_grad():
            ref = built[REFERENCE](inp.x)
    for name in list(built):
        if ref is not None and name in SAME_FUNCTION:
            _set_mode(built[name], False)
            try:
                with torch.no_grad():
                    rel[name] = _rel_err(built[name](inp.x), ref)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                del built[name]
    rows = []
    common = dict(level="layer", axis=axis, **case.as_dict(), seqs=inp.seqs, positions=inp.pos)
    for mode in modes:
        fns, untimed = {}, {}
        for name, peer in built.items():
            _set_mode(peer, mode != "fwd")
            try:
                (untimed if "interpreter" in name else fns)[name] = _runner(peer, inp, mode)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
        res = interleaved(fns, device, rounds=rounds, min_sample_s=min_sample_s, max_seconds=max_seconds)
        for name in fns:
            row = dict(common, peer=name, mode=mode, rel_err_vs_reference=rel.get(name), **res.stats(name),
                       **ratios(res, name))
            if name == REFERENCE:
                row["algorithm"] = torch_algorithm(inp, mode != "fwd")
            row["peak_mem_mb"] = peak_memory_mb(fns[name], device)
            rows.append(row)
        for name, fn in untimed.items():
            try:
                fn()  # interpreted kernels: one run shows the path works; its time means nothing
                rows.append(dict(common, peer=name, mode=mode, rel_err_vs_reference=rel.get(name), ran=True))
            except Exception as e:
                rows.append(dict(common, peer=name, mode=mode, error=f"{type(e).__name__}: {e}"))
        if progress is not None:
            progress.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, err in errors.items():
        rows.append(dict(common, peer=name, mode="-", error=err))
    return rows
