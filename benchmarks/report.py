"""Results JSON -> markdown table and PNG plots. ``python -m benchmarks.report RESULTS.json`` redraws them."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def _case_label(r: dict) -> str:
    shape = f"{r['seqs']}x{r['positions']}" if "seqs" in r else ""
    return (("decode " if r.get("axis") == "decode" else "") + f"N={r['tokens']} {shape} T={r['tasks']} "
            f"h={r['heads']} m={r['skills']} r={r['rank']} d={r['d']} o={r['o']} {r['dtype']}")


def _iqr(r: dict, key: str, spec: str) -> str:
    if r.get(key) is None:
        return "—"
    lo, hi = r.get(key + "_q1"), r.get(key + "_q3")
    return _fmt(r[key], spec) + ("" if lo is None else f" [{_fmt(lo, spec)}, {_fmt(hi, spec)}]")


def _table(head: List[str], columns: str, rows: List[dict], keys, values) -> List[str]:
    """A markdown section: ``head`` lines, a header of ``columns`` ("name:align | ..."), then per
    row its ``keys(r)`` cells and either ``values(r)`` or the row's error."""
    names, aligns = zip(*(c.strip().rsplit(":", 1) for c in columns.split("|")))
    lines = head + ["| " + " | ".join(names) + " |", "| " + " | ".join("---:" if a == "r" else "---"
                                                                         for a in aligns) + " |"]
    for r in rows:
        cells = keys(r)
        if "median_ms" in r:
            cells += values(r)
        elif r.get("ran"):
            cells += ["ran (not timed)"] + [""] * (len(names) - len(cells) - 1)
        else:
            cells += [f"error: {r.get('error', '')[:80]}"] + [""] * (len(names) - len(cells) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# routedlora benchmark — {env['device_name']}", "",
             f"- command: `{env['command']}`",
             f"- torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, peft {env.get('peft')}, "
             f"transformers {env.get('transformers')}, commit {env.get('git_commit')}",
             f"- threads: {env.get('threads')} of {env.get('cpu_count')} cores; sanity line (512-cube matmul): "
             f"{_fmt(env.get('sanity_gflops_start'), '.0f')} GFLOP/s at the start, "
             f"{_fmt(env.get('sanity_gflops_end'), '.0f')} at the end",
             f"- profile: {env['profile']}; {env['note']}", ""]
    level = lambda name: [r for r in result["rows"] if r["level"] == name]  # noqa: E731
    if level("layer"):
        lines += _table(
            ["## Layer: one routed nn.Linear (median ms; ratios are medians of same-round ratios [quartiles])", "",
             "overhead = (t − t_base) / t_base; ×PEFT Poly = t / t_PEFT Poly; PEFT Poly ov ÷ ov = PEFT Poly's overhead "
             "÷ this peer's (≥ 1: less overhead than PEFT Poly); rel err = ‖y − y_ref‖/‖y_ref‖ against routedlora's "
             "reference, eval mode; algo = what `routedlora[torch]` chose.", ""],
            "case:l | mode:l | peer:l | median ms:r | overhead:r | ×PEFT Poly:r | PEFT Poly ov ÷ ov:r | algo:l | "
            "peak MB:r | rel err:r",
            level("layer"), lambda r: [_case_label(r), r["mode"], r["peer"]],
            lambda r: [_fmt(r["median_ms"]), _iqr(r, "overhead", "+.2f"), _iqr(r, "x_peft_poly", ".2f"),
                       _iqr(r, "peft_poly_overhead_ratio", ".2f"), r.get("algorithm", ""),
                       _fmt(r.get("peak_mem_mb"), ".0f"), _fmt(r.get("rel_err_vs_reference"), ".1e")])
    if level("grouping"):
        lines += _table(
            ["## Routing metadata: tokens grouped by routing row (median ms)", ""],
            "pattern:l | tokens:r | rows:r | peer:l | median ms:r | ×torch:r | same result:l",
            level("grouping"), lambda r: [r["pattern"], str(r["tokens"]), str(r["rows"]), r["peer"]],
            lambda r: [_fmt(r["median_ms"]), _fmt(r.get("x_torch"), ".2f"), str(r.get("matches_torch"))])
    if level("model"):
        lines += _table(
            ["## Model: Llama-style decoder, routed LoRA on the named projections", "",
             "speed ×peer = median over rounds of t_peer / t (> 1: faster than that peer) [quartiles].", ""],
            "model:l | step:l | peer:l | median ms:r | tokens/s:r | speed ×PEFT LoRA:r | speed ×PEFT Poly:r | "
            "ms/new token:r | peak MB:r",
            level("model"), lambda r: [r["name"], r["mode"], r["peer"]],
            lambda r: [_fmt(r["median_ms"]), _fmt(r["tokens_per_s"], ".0f"), _iqr(r, "speed_vs_peft_lora", ".2f"),
                       _iqr(r, "speed_vs_peft_poly", ".2f"), _fmt(r.get("ms_per_new_token")),
                       _fmt(r.get("peak_mem_mb"), ".0f")])
    return "\n".join(lines)


def _vary(rows: List[dict], axis: str) -> List[dict]:
    """The base case's rows and those of the sweep over ``axis``."""
    return [r for r in rows if r.get("axis") in ("base", axis)]


def plots(result: dict, stem: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["level"] == "layer" and "median_ms" in r]
    base_case = result.get("base_case")
    if not rows or not base_case:
        return []
    device = result["env"]["device_name"]
    made = []
    specs = [("tokens", "median_ms", "time (ms)", "time vs tokens", "tokens"),
             ("tasks", "overhead", "overhead over the frozen base", "overhead vs tasks per batch", "tasks"),
             ("tokens_per_row", "overhead", "overhead over the frozen base", "overhead vs tokens per routing row",
              "positions"),
             ("tokens", "peak_mem_mb", "peak memory (MB)", "memory vs tokens", "tokens")]
    for axis, metric, ylabel, title, xkey in specs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        drawn, label = False, _case_label(base_case)
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            sel = [r for r in (rows if axis == "tokens_per_row" else _vary(rows, axis))
                   if r["mode"] == mode and r.get(metric) is not None
                   and (axis != "tokens_per_row" or r.get("axis") == axis)]
            values = []
            if axis == "tokens_per_row" and sel:
                label = _case_label({**sel[0], "seqs": "R", "positions": "S"})
            for peer in dict.fromkeys(r["peer"] for r in sel):
                pts = sorted((r[xkey], r[metric]) for r in sel if r["peer"] == peer)
                if metric == "overhead" and peer == "base":
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
                values += [p[1] for p in pts]
                drawn = True
            ax.set_xscale("log")
            # log y where values span decades (overheads are positive but for noise)
            positive = [v for v in values if v > 0]
            if positive and min(values) > 0 and max(positive) / min(positive) > 20:
                ax.set_yscale("log")
            ax.set_xlabel("tokens per routing row" if axis == "tokens_per_row" else axis)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
            ax.grid(True, which="both", alpha=0.3)
        if not drawn:
            plt.close(fig)
            continue
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} — {device} ({label}, {axis} varied)", fontsize=9)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{title.replace(' ', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_all(result: dict, stem: Path) -> List[Path]:
    """Write ``stem.json``, ``stem.md`` and the plots; return the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1))
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plots(result, stem)]


if __name__ == "__main__":
    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    for p in write_all(res, src.with_suffix("")):
        print(p)
