"""Command line: ``python -m routedlora.training`` (single process) or under ``torchrun`` (DDP / FSDP2).

Examples::

    python -m routedlora.training --recipe mhr --tasks copy,reverse,shift,swap --steps 400
    python -m routedlora.training --recipe lora --tasks copy,reverse,shift,swap   # shared-LoRA baseline
    torchrun --nproc_per_node 2 -m routedlora.training --parallel ddp --recipe poly
    python -m routedlora.training --recipe mhr-z --init-adapter out/final/adapter.safetensors \\
        --tasks rotate --train-size 32 --steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from ..config import MTA_OPTIONS
from .data import TASKS, CharTokenizer, load_jsonl, synthetic_tasks
from .distributed import PARALLEL, init_distributed
from .models import TINY, build_model, default_targets
from .recipes import RECIPES, adapter_parameters, apply_recipe
from .sampler import MIXING
from .trainer import SCHEDULES, MultiTaskTrainer, TrainConfig, read_manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routedlora.training",
                                description="Mixed-task training with routed LoRA (Poly, MHR, C-Poly, MTA).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-llama",
                   help=f"{' | '.join(TINY)} (random init, no download) or a Hugging Face name/path")
    g.add_argument("--hidden", type=int, default=64, help="width of the tiny models")
    g.add_argument("--layers", type=int, default=2, help="layers of the tiny models")
    g.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: every nn.Linear but the output head)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", default="poly", choices=RECIPES)
    g.add_argument("--n-skills", type=int, default=4)
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--heads", type=int, default=None, help="MHR heads (recipe mhr: default 4)")
    g.add_argument("--alpha", type=float, default=None, help="scale numerator (default: rank, i.e. γ = 1)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="recipe lora: rank of the shared LoRA (default: matched to --n-skills x --rank)")
    g.add_argument("--init-adapter", default=None, help="mhr-z / mhr-mu / mta-stage2: the trained adapter file")
    g.add_argument("--stage2-at", type=int, default=None,
                   help="recipes mta / mta-alter: switch to stage 2 before this step")
    g.add_argument("--mta-blocks", type=int, default=None,
                   help="recipe mta-alter: experts on the FFN of this many last blocks (default 1, as ALTER)")
    for flag, field in (("--mta-init", "mta_init"), ("--mta-routing", "mta_routing"),
                        ("--mta-stage2", "mta_stage2"), ("--mta-gate", "mta_gate")):
        g.add_argument(flag, default=None, choices=MTA_OPTIONS[field],
                       help=f"recipes mta / mta-alter: config.{field} (default {MTA_OPTIONS[field][0]!r}, ALTER's code)")
    g.add_argument("--noise-seed", type=int, default=None,
                   help="seed of each layer's own Gumbel-noise generator (default: torch's global RNG)")
    g = p.add_argument_group("data")
    g.add_argument("--tasks", default="copy,reverse,shift,swap", help=f"synthetic tasks from {sorted(TASKS)}")
    g.add_argument("--train-size", default="2000", help="examples per task: one int or one per task, comma-separated")
    g.add_argument("--eval-size", type=int, default=256, help="held-out examples per task")
    g.add_argument("--length", type=int, default=6, help="letters per synthetic input")
    g.add_argument("--no-task-prefix", action="store_true", help="leave the task name out of the prompt")
    g.add_argument("--data", default=None, help='JSONL file of {"task", "input", "target"} (tokenised with --model\'s tokenizer)')
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--batch-size", type=int, default=32, help="global batch size")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--router-lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=None)
    g.add_argument("--schedule", default="constant", choices=SCHEDULES)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--mixing", default="proportional", choices=MIXING)
    g.add_argument("--mixing-temperature", type=float, default=1.0)
    g.add_argument("--mixing-cap", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--eval-every", type=int, default=None, help="default: evaluate at the end only")
    g.add_argument("--save-every", type=int, default=None)
    g.add_argument("--output-dir", default=None)
    g.add_argument("--resume", default=None, help="checkpoint directory (step_<n>/ or final/) to resume from")
    g.add_argument("--resume-allow-config-change", action="store_true",
                   help="resume even though options that change the computation (--lr, --batch-size, --alpha, "
                        "...) differ from the checkpoint's (the adapter's shape must still match)")
    g.add_argument("--parallel", default="none", choices=PARALLEL, help="under torchrun: ddp or fsdp")
    g.add_argument("--dist-backend", default=None, help="gloo | nccl (default: nccl with CUDA, else gloo)")
    g.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) when available, else cpu")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on a CPU: the cores not already busy, by the load average, at "
                        "least 1; tiny models: 1 is fastest)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", default=None, help="write the final per-task evaluation here")
    return p


def _ints(text: str, n: int, name: str) -> List[int]:
    try:
        vals = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected ints, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise ValueError(f"{name}: expected one value or {n}, got {len(vals)}")
    return vals


def idle_cores() -> int:
    """CPU cores this process may use that the load average does not show busy (at least 1).

    OpenMP threads wait for each other at every parallel region, so one thread sharing a core
    with another process stalls all of them: on a shared machine, asking for every core is
    slower than asking for the idle ones.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def _mta_options(args) -> dict:
    """The ``--mta-*`` flags given, as :class:`RoutedLoraConfig` fields."""
    return {f: getattr(args, f) for f in MTA_OPTIONS if getattr(args, f, None) is not None}


def build(args, log=print):
    """Model, data and trainer from parsed arguments (also used by the example)."""
    rank, world = init_distributed(args.dist_backend)
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, idle_cores() // world))
        log(f"threads: {torch.get_num_threads()} (idle cores by the load average; --threads to set)")
    tok = None
    if args.data:
        from transformers import AutoTokenizer

        if args.model in TINY:
            raise ValueError("--data: a JSONL file needs a Hugging Face --model whose tokenizer reads it")
        if not os.path.isfile(args.data):  # before the tokenizer, which may have to be downloaded
            if os.path.isdir(args.data):
                raise ValueError(f"--data: {args.data} is a directory, expected a JSONL file")
            raise FileNotFoundError(f"--data: {args.data}: no such file")
        tok = AutoTokenizer.from_pretrained(args.model)
        data = load_jsonl(args.data, tok)
        names = list(data)
        train, evals = {}, {}
        for n in names:  # hold out the last eval-size examples (at most a fifth) of each task
            k = min(args.eval_size, len(data[n]) // 5)
            train[n], evals[n] = data[n][:len(data[n]) - k], data[n][len(data[n]) - k:]
        vocab, pad_id = None, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        names = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown tasks {unknown}; choose from {sorted(TASKS)}")
        ctok = CharTokenizer()
        sizes = _ints(args.train_size, len(names), "--train-size")
        prefix = not args.no_task_prefix
        train = synthetic_tasks(names, sizes, length=args.length, seed=args.seed, task_prefix=prefix, tokenizer=ctok)
        evals = synthetic_tasks(names, args.eval_size, length=args.length, seed=args.seed + 10_000,
                                task_prefix=prefix, tokenizer=ctok)
        vocab, pad_id = ctok.vocab_size, ctok.pad_token_id
    model = build_model(args.model, vocab_size=vocab, hidden=args.hidden, layers=args.layers, seed=args.seed)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    targets = args.target_modules.split(",") if args.target_modules else default_targets(model)
    r = args.rank
    if args.recipe == "lora":
        from .recipes import matched_lora_rank, recipe_config

        routed = recipe_config("mhr" if (args.heads or 1) > 1 else "poly", n_tasks=len(names),
                               target_modules=targets, n_skills=args.n_skills, r=args.rank, n_heads=args.heads)
        r = args.lora_rank or matched_lora_rank(model, routed)
    overrides = apply_recipe(model, args.recipe, n_tasks=len(names), target_modules=targets, n_skills=args.n_skills,
                             r=r, n_heads=args.heads, alpha=args.alpha if args.recipe != "lora" or args.alpha
                             else float(args.rank), backend=args.backend, seed=args.noise_seed,
                             init_adapter=args.init_adapter, mta_stage2_at=args.stage2_at,
                             mta_blocks=getattr(args, "mta_blocks", None), mta_options=_mta_options(args))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, schedule=args.schedule,
                         warmup_steps=args.warmup_steps, mixing=args.mixing,
                         mixing_temperature=args.mixing_temperature, mixing_cap=args.mixing_cap, seed=args.seed,
                         log_every=args.log_every, eval_every=args.eval_every or args.steps,
                         save_every=args.save_every, output_dir=args.output_dir, parallel=args.parallel,
                         progress=not args.no_progress, **overrides)
    trainer = MultiTaskTrainer(model, train, config, eval_tasks=evals, pad_id=pad_id, log=log)
    if rank == 0:
        log(f"routedlora.training: model={args.model} recipe={args.recipe} tasks={names} "
            f"adapter parameters={adapter_parameters(model)} (rank {r}) world={world} parallel={args.parallel} "
            f"device={device}")
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.resume_allow_config_change and not args.resume:
        parser().error("--resume-allow-config-change: needs --resume")
    import torch.distributed as dist

    try:
        if args.resume:  # a wrong path fails now, not after the model is built (or downloaded)
            read_manifest(args.resume)
        trainer = build(args)
        trainer.train(resume_from=args.resume, allow_config_change=args.resume_allow_config_change)
        final = trainer.history["eval"][-1]["tasks"] if trainer.history["eval"] else {}
        if trainer.rank == 0 and final:
            print("final evaluation (held-out, teacher-forced greedy):")
            for name, v in final.items():
                print(f"  {name:10s} loss {v['loss']:.4f}  token acc {v['token_acc']:.4f}  "
                      f"exact match {v['exact']:.4f}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"recipe": args.recipe, "eval": final, "loss": trainer.history["loss"]}, f)
    except (ValueError, TypeError, OSError) as e:
        # a user's mistake (options, data, checkpoint, paths): one line, no traceback
        # (ROUTEDLORA_TRACEBACK=1 shows it, for a bug report)
        if os.environ.get("ROUTEDLORA_TRACEBACK", "") not in ("", "0"):
            raise
        where = f" (rank {os.environ.get('RANK', '?')})" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
        message = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        print(f"error{where}: {message}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


__all__ = ["build", "main", "parser"]
