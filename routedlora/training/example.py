"""The multi-task example: routed LoRA against one shared LoRA with the same trainable-parameter budget.

Four synthetic text tasks (copy, reverse, shift, swap; prompt ``"<task>:<letters>="``) are
trained in mixed batches on a tiny frozen Llama-style decoder built from a config (no
downloads). The routed model is ALTER's MTA (stage 1: four task skills of rank 8, top-2
Softmax-T routing); the baseline is one LoRA on the same modules whose rank is chosen so
that it has at least as many trainable parameters. Both see the same batches (the task
name is in every prompt, so the shared LoRA can tell the tasks apart too). Held-out
per-task token accuracy and exact match (teacher-forced greedy) are printed::

    python -m routedlora.training.example                 # about 25 s on 2 CPU cores
    python -m routedlora.training.example --routed-recipe mhr --no-task-prefix
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from .cli import build, parser as cli_parser
from .data import TASKS


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(argv_common, routed_recipe: str, log=print):
    p = cli_parser()
    routed = build(p.parse_args(argv_common + ["--recipe", routed_recipe]), log=lambda s: None)
    n_routed = _trainable(routed.model)
    # rank of a shared LoRA with at least n_routed trainable parameters on the same modules
    from ..inject import routed_layers

    layers = [layer for _, layer in routed_layers(routed.model)]
    per_rank = sum(layer.in_features + layer.out_features for layer in layers)
    rank = math.ceil(n_routed / per_rank)
    lora = build(p.parse_args(argv_common + ["--recipe", "lora", "--lora-rank", str(rank)]), log=lambda s: None)
    n_lora = _trainable(lora.model)
    results = {}
    for name, trainer, n in ((f"routed ({routed_recipe})", routed, n_routed), (f"shared LoRA (rank {rank})", lora, n_lora)):
        t0 = time.time()
        torch.manual_seed(0)
        trainer.train()
        results[name] = {"trainable_params": n, "seconds": time.time() - t0,
                         "eval": trainer.history["eval"][-1]["tasks"]}
        log(f"{name}: {n} trainable parameters, trained in {results[name]['seconds']:.0f}s")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routed-recipe", default="mta", choices=["mta", "poly", "mhr", "cpoly"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--tasks", default="copy,reverse,shift,swap", help=f"from {sorted(TASKS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-task-prefix", action="store_true", help="only the routing tells the tasks apart")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    common = ["--steps", str(args.steps), "--tasks", args.tasks, "--seed", str(args.seed), "--threads",
              str(args.threads), "--no-progress", "--log-every", "0", "--router-lr", "3e-2"]
    if args.routed_recipe == "mhr":
        common += ["--heads", "2"]
    if args.no_task_prefix:
        common.append("--no-task-prefix")
    res = run(common, args.routed_recipe)
    names = list(next(iter(res.values()))["eval"])
    print("held-out per-task accuracy (token accuracy / exact match):")
    print(f"{'':28s}" + "".join(f"{n:>16s}" for n in names) + f"{'mean':>16s}")
    for label, r in res.items():
        ev = r["eval"]
        cells = [f"{ev[n]['token_acc']:.3f} / {ev[n]['exact']:.3f}" for n in names]
        mean_t = sum(ev[n]["token_acc"] for n in names) / len(names)
        mean_e = sum(ev[n]["exact"] for n in names) / len(names)
        print(f"{label:28s}" + "".join(f"{c:>16s}" for c in cells) + f"{mean_t:.3f} / {mean_e:.3f}".rjust(16))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
