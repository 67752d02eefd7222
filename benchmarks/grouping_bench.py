"""Routing metadata: tokens grouped by routing row, the CUDA kernel against torch's op chain.

The Triton path needs, per layer call, the tokens sorted by routing row (stable) and each
row's offset. torch does it as argsort + gather + searchsorted (+ arange);
``routedlora_cuda::group_by_row`` (csrc/group_rows.cu) does it in one single-block launch.
This suite finds where the kernel stops paying off, which sets
``routedlora.ops.cuda_backend.GROUP_MAX_TOKENS``.

Patterns: ``per-sequence`` (rows sorted, 256 tokens each, as with one task per sequence)
and ``mixed`` (every token a random one of 64 rows, as with token-level routing).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from routedlora.timing import interleaved

TOKENS = (64, 512, 4096, 16384, 65536)


def _ids(N: int, pattern: str, device) -> tuple:
    g = torch.Generator().manual_seed(N)
    if pattern == "per-sequence":
        R = max(1, N // 256)
        rid = torch.arange(N) * R // max(N, 1)
    else:
        R = 64
        rid = torch.randint(0, R, (N,), generator=g)
    return rid.to(device), R


def peers(device: torch.device) -> Dict[str, object]:
    from routedlora.ops import cuda_backend, triton_backend

    out = {"torch sort chain": triton_backend._routing_meta}
    if device.type == "cuda" and cuda_backend.is_available(device):
        try:
            cuda_backend.require(device)
            out["routedlora_cuda.group_by_row"] = torch.ops.routedlora_cuda.group_by_row
        except RuntimeError as exc:  # reported, not fatal: the other suites still run
            print(f"grouping: cuda kernel unavailable: {exc}")
    return out


def run(device: torch.device, *, rounds: int, min_sample_s: float, max_seconds: float, progress=None) -> List[dict]:
    rows = []
    fns = peers(device)
    for pattern in ("per-sequence", "mixed"):
        for N in TOKENS:
            rid, R = _ids(N, pattern, device)
            want = fns["torch sort chain"](rid, R)
            timed, out = {}, []
            for name, fn in fns.items():
                row = dict(level="grouping", peer=name, pattern=pattern, tokens=N, rows=R)
                try:
                    got = fn(rid, R)
                    row["matches_torch"] = all(torch.equal(a, b) for a, b in zip(got, want))
                    timed[name] = (lambda fn=fn: fn(rid, R))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                out.append(row)
            res = interleaved(timed, device, rounds=rounds, min_sample_s=min_sample_s, max_seconds=max_seconds)
            for row in out:
                if row["peer"] in timed:
                    row.update(res.stats(row["peer"]))
                    q = res.ratio(row["peer"], "torch sort chain")
                    row["x_torch"] = q and q["median"]
            rows += out
            if progress is not None:
                progress.update(1)
    return rows


def n_runs(device: torch.device) -> int:
    return 2 * len(TOKENS)
