"""The multi-task example: routed LoRA against one shared LoRA with the same trainable-parameter budget.

Four synthetic text tasks (copy, reverse, shift, swap; prompt ``"<task>:<letters>="``) are
trained in mixed batches on a tiny frozen Llama-style decoder built from a config (no
downloads). The routed model is ALTER's MTA (stage 1: four task skills of rank 8, dense
Softmax-T routing from ALTER's initialisation, as ALTER's code does); the baseline is one
LoRA on the same modules whose rank is chosen so that it has at least as many trainable
parameters. Both see the same batches (the task name is in every prompt, so the shared
LoRA can tell the tasks apart too). Held-out per-task token accuracy and exact match
(teacher-forced greedy) are printed::

    python -m routedlora.training.example                 # about 25 s on 2 CPU cores
    python -m routedlora.training.example --routed-recipe mhr --no-task-prefix
    # MTA as routedlora configured it before following ALTER's code (saturated init, top-2):
    python -m routedlora.training.example --mta-init own_skill --mta-routing topk --mta-stage2 topk --mta-gate tanh
    python -m routedlora.training.example --routed-recipe mta-alter   # experts on the last block's FFN
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from ..config import MTA_OPTIONS
from .cli import build, parser as cli_parser
from .data import TASKS


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(argv_common, routed_recipe: str, log=print, routed_argv=()):
    p = cli_parser()
    routed = build(p.parse_args(argv_common + ["--recipe", routed_recipe] + list(routed_argv)), log=lambda s: None)
    n_routed = _trainable(routed.model)
    # rank of a shared LoRA with at least n_routed trainable parameters on the same modules
    from ..inject import routed_layers

    named = routed_layers(routed.model)
    layers = [layer for _, layer in named]
    per_rank = sum(layer.in_features + layer.out_features for layer in layers)
    rank = math.ceil(n_routed / per_rank)
    # mta-alter picks its own modules: the shared LoRA goes on the same ones
    same = ["--target-modules", ",".join(n for n, _ in named)] if routed_recipe == "mta-alter" else []
    lora = build(p.parse_args(argv_common + same + ["--recipe", "lora", "--lora-rank", str(rank)]),
                 log=lambda s: None)
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
    ap.add_argument("--routed-recipe", default="mta", choices=["mta", "mta-alter", "poly", "mhr", "cpoly"])
    for flag, field in (("--mta-init", "mta_init"), ("--mta-routing", "mta_routing"),
                        ("--mta-stage2", "mta_stage2"), ("--mta-gate", "mta_gate")):
        ap.add_argument(flag, default=None, choices=MTA_OPTIONS[field],
                        help=f"MTA recipes: config.{field} (default {MTA_OPTIONS[field][0]!r}, ALTER's code)")
    ap.add_argument("--mta-blocks", type=int, default=None, help="recipe mta-alter: last blocks with experts")
    ap.add_argument("--stage2-at", type=int, default=None,
                    help="MTA recipes: ALTER's stage 2 (shared skills + gate) from this step on")
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
    routed_argv = []
    for flag in ("mta_init", "mta_routing", "mta_stage2", "mta_gate", "mta_blocks", "stage2_at"):
        value = getattr(args, flag)
        if value is not None:
            if not args.routed_recipe.startswith("mta"):
                ap.error(f"--{flag.replace('_', '-')}: only for the MTA recipes")
            routed_argv += ["--" + flag.replace("_", "-"), str(value)]
    res = run(common, args.routed_recipe, routed_argv=routed_argv)
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
