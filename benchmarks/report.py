"""Results JSON -> markdown table and PNG plots. ``python -m benchmarks.report RESULTS.json`` redraws them."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def _case_label(r: dict) -> str:
    return (("decode " if r.get("axis") == "decode" else "") + f"N={r['tokens']} T={r['tasks']} h={r['heads']} m={r['skills']} r={r['rank']} "
            f"d={r['d']} o={r['o']} {r['dtype']}")


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# routedlora benchmark — {env['device_name']}", "",
             f"- command: `{env['command']}`",
             f"- torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, peft {env.get('peft')}, "
             f"transformers {env.get('transformers')}, commit {env.get('git_commit')}",
             f"- profile: {env['profile']}; {env['note']}", ""]
    layer = [r for r in result["rows"] if r["level"] == "layer"]
    if layer:
        lines += ["## Layer: one routed nn.Linear (median ms; ratios in the same run)", "",
                  "overhead = (t − t_base) / t_base; ×PEFT Poly = t / t_PEFT Poly; rel err = ‖y − y_ref‖/‖y_ref‖ "
                  "against routedlora's reference, eval mode.", "",
                  "| case | mode | peer | median ms | min–max | overhead | ×PEFT Poly | peak MB | rel err |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in layer:
            if "median_ms" not in r:
                lines.append(f"| {_case_label(r)} | {r['mode']} | {r['peer']} | error: {r.get('error', '')[:80]} "
                             "| | | | | |")
                continue
            lines.append(f"| {_case_label(r)} | {r['mode']} | {r['peer']} | {_fmt(r['median_ms'])} | "
                         f"{_fmt(r['min_ms'])}–{_fmt(r['max_ms'])} | {_fmt(r.get('overhead'), '+.2f')} | "
                         f"{_fmt(r.get('x_peft_poly'), '.2f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
                         f"{_fmt(r.get('rel_err_vs_reference'), '.1e')} |")
        lines.append("")
    grouping = [r for r in result["rows"] if r["level"] == "grouping"]
    if grouping:
        lines += ["## Routing metadata: tokens grouped by routing row (median ms)", "",
                  "| pattern | tokens | rows | peer | median ms | ×torch | same result |",
                  "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
        for r in grouping:
            if "median_ms" not in r:
                lines.append(f"| {r['pattern']} | {r['tokens']} | {r['rows']} | {r['peer']} | "
                             f"error: {r.get('error', '')[:80]} | | |")
                continue
            lines.append(f"| {r['pattern']} | {r['tokens']} | {r['rows']} | {r['peer']} | {_fmt(r['median_ms'])} | "
                         f"{_fmt(r.get('x_torch'), '.2f')} | {r.get('matches_torch')} |")
        lines.append("")
    model = [r for r in result["rows"] if r["level"] == "model"]
    if model:
        lines += ["## Model: Llama-style decoder, routed LoRA on all attention and MLP projections", "",
                  "| model | step | peer | median ms | tokens/s | ×PEFT LoRA | ×PEFT Poly | ms/new token | peak MB |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in model:
            if "median_ms" not in r:
                lines.append(f"| {r['name']} | {r['mode']} | {r['peer']} | error: {r.get('error', '')[:80]} "
                             "| | | | | |")
                continue
            lines.append(f"| {r['name']} | {r['mode']} | {r['peer']} | {_fmt(r['median_ms'])} | "
                         f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r.get('speed_vs_peft_lora'), '.2f')} | "
                         f"{_fmt(r.get('speed_vs_peft_poly'), '.2f')} | {_fmt(r.get('ms_per_new_token'))} | "
                         f"{_fmt(r.get('peak_mem_mb'), '.0f')} |")
        lines.append("")
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
    specs = [("tokens", "median_ms", "time (ms)", "time vs tokens"),
             ("tasks", "overhead", "overhead over the frozen base", "overhead vs tasks per batch"),
             ("tokens", "peak_mem_mb", "peak memory (MB)", "memory vs tokens")]
    for axis, metric, ylabel, title in specs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        drawn = False
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            sel = [r for r in _vary(rows, axis) if r["mode"] == mode and r.get(metric) is not None]
            for peer in dict.fromkeys(r["peer"] for r in sel):
                pts = sorted((r[axis], r[metric]) for r in sel if r["peer"] == peer)
                if metric == "overhead" and peer == "base":
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
                drawn = True
            ax.set_xscale("log")
            if metric != "overhead":
                ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
            ax.grid(True, which="both", alpha=0.3)
        if not drawn:
            plt.close(fig)
            continue
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} — {device} ({_case_label(base_case)}, "
                     f"{axis} varied)", fontsize=9)
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
