"""The mixed-task trainer: any Hugging Face causal or seq2seq LM with routed LoRA injected.

Every batch mixes tasks (each example draws its own task from a :class:`TaskSampler`);
the batch is routed with :func:`routedlora.routing`. The loss is the mean over examples
of each example's mean token loss on its target. Per-task loss, token accuracy and exact
match (all target tokens right under teacher forcing, which is exactly greedy decoding
being right) are logged every ``log_every`` steps, and per-step losses are kept in
``history["loss"]``.

Checkpoints hold only the adapter (``adapter.safetensors``, loadable with
:func:`routedlora.load_adapter`) and the trainer state (optimizer, sampler, RNG states,
step) per rank: resuming replays exactly the loss sequence of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import _FORMAT
from ..inject import model_config, routed_layers, routing, set_trainable
from ..recipes import mta_stage2, param_groups
from .data import collate
from .distributed import PARALLEL, copy_full_, full_tensor, rank_world, shard_fsdp2, wrap_ddp
from .sampler import MIXING, TaskSampler

ADAPTER_FILE = "adapter.safetensors"
SCHEDULES = ("constant", "linear", "cosine")
TASK_ROUTING = ("task", "shared")


@dataclass
class TrainConfig:
    """Options of :class:`MultiTaskTrainer`.

    Args:
        steps: optimizer steps (in total, counting steps done before a resume).
        batch_size: global batch size (split evenly over data-parallel ranks).
        lr / router_lr: learning rate of skills (and gate) / of the routing logits
            (default: ``lr``; mttl uses 0.1 vs 1e-3).
        weight_decay, max_grad_norm: AdamW weight decay on the skills, gradient clipping.
        schedule, warmup_steps: ``constant | linear | cosine`` decay after linear warm-up.
        mixing, mixing_temperature, mixing_cap: task mixing (see :mod:`.sampler`).
        seed: seeds the sampler (the model's own noise follows torch's RNG or ``config.seed``).
        task_routing: ``"task"`` routes each example by its task (id ``task_offset + t``);
            ``"shared"`` routes every example to row 0 (one shared adapter, or MHR-μ).
        mta_stage2_at: MTA recipe: switch to ALTER's stage 2 before this step.
        log_every, eval_every, save_every: in steps (``None`` / 0: never; eval and save
            also at the end when set).
        output_dir: where checkpoints (``step_<n>/`` and ``final/``) and ``log.jsonl`` go.
        parallel: ``"none" | "ddp" | "fsdp"`` (with an initialised process group).
        progress: show a tqdm progress bar (rank 0).
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    router_lr: Optional[float] = None
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None
    schedule: str = "constant"
    warmup_steps: int = 0
    mixing: str = "proportional"
    mixing_temperature: float = 1.0
    mixing_cap: Optional[int] = None
    seed: int = 0
    task_routing: str = "task"
    task_offset: int = 0
    mta_stage2_at: Optional[int] = None
    log_every: int = 50
    eval_every: Optional[int] = None
    eval_batch_size: int = 128
    save_every: Optional[int] = None
    output_dir: Optional[str] = None
    parallel: str = "none"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("warmup_steps", "task_offset", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name in ("eval_every", "save_every", "mta_stage2_at"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name}: expected an int >= 0 or None, got {v!r}")
        for name in ("lr", "router_lr", "weight_decay", "max_grad_norm", "mixing_temperature"):
            v = getattr(self, name)
            if v is None and name in ("router_lr", "max_grad_norm"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    v == 0 and name != "weight_decay"):
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixing not in MIXING:
            raise ValueError(f"mixing: expected one of {MIXING}, got {self.mixing!r}")
        if self.task_routing not in TASK_ROUTING:
            raise ValueError(f"task_routing: expected one of {TASK_ROUTING}, got {self.task_routing!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel: expected one of {PARALLEL}, got {self.parallel!r}")


def example_metrics(logits: torch.Tensor, labels: torch.Tensor, *, encoder_decoder: bool):
    """Per example: mean token loss on the labelled positions, token accuracy, exact match (float32)."""
    if not encoder_decoder:  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    tok = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n_valid = valid.sum(1)
    denom = n_valid.clamp(min=1).float()
    correct = ((logits.argmax(-1) == labels) & valid).sum(1)
    return tok.sum(1) / denom, correct.float() / denom, (correct == n_valid).float()


class MultiTaskTrainer:
    """Train an injected model on several tasks at once.

    Args:
        model: a Hugging Face (or any) model with routed LoRA injected
            (:func:`routedlora.inject`, a recipe applied if any). Causal LMs and
            encoder-decoders (``config.is_encoder_decoder``) are both handled.
        train_tasks: ``{task name: examples}``; an example is ``{"prompt": ids, "target": ids}``.
        config: :class:`TrainConfig`.
        eval_tasks: optional ``{task name: examples}`` for :meth:`evaluate`.
        pad_id: padding token id.
        log: called with each log line (rank 0 only).
    """

    def __init__(self, model: nn.Module, train_tasks: Mapping[str, Sequence[Mapping]], config: TrainConfig, *,
                 eval_tasks: Optional[Mapping[str, Sequence[Mapping]]] = None, pad_id: int = 0,
                 log: Callable[[str], None] = print):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if model_config(model) is None or not routed_layers(model):
            raise ValueError("model: has no routed LoRA layers; call routedlora.inject(model, config) first")
        if not isinstance(train_tasks, Mapping) or not train_tasks:
            raise ValueError("train_tasks: expected a non-empty {task name: examples} mapping")
        for name, data in train_tasks.items():
            if not len(data):
                raise ValueError(f"train_tasks: task {name!r} has no examples")
        self.model = model
        self.config = config
        self.task_names: List[str] = list(train_tasks)
        self.train_tasks = train_tasks
        self.eval_tasks = eval_tasks
        self.pad_id = pad_id
        self.log = log
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        n_rows = min(layer.n_tasks for _, layer in routed_layers(model))
        T = len(self.task_names)
        if config.task_routing == "task" and config.task_offset + T > n_rows:
            raise ValueError(f"train_tasks: {T} tasks from id {config.task_offset} need {config.task_offset + T} "
                             f"routing rows, the model has {n_rows} (raise n_tasks or use task_routing='shared')")
        self.rank, self.world = rank_world()
        if config.parallel != "none" and self.world == 1 and not dist.is_initialized():
            raise ValueError(f"parallel: {config.parallel!r} needs an initialised process group (use torchrun)")
        if self.world > 1 and config.parallel == "none":
            raise ValueError("parallel: a process group of several ranks is initialised; choose 'ddp' or 'fsdp'")
        if config.batch_size % self.world:
            raise ValueError(f"batch_size: {config.batch_size} is not divisible by the world size {self.world}")
        self.local_batch = config.batch_size // self.world
        self.sampler = TaskSampler([len(train_tasks[n]) for n in self.task_names], config.mixing,
                                   config.mixing_temperature, config.mixing_cap, seed=config.seed)
        self.device = next(model.parameters()).device
        if config.parallel == "fsdp":
            shard_fsdp2(model)
        self.engine = model
        self._wrap()
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.history: Dict[str, list] = {"loss": [], "log": [], "eval": []}
        self._pending: List[torch.Tensor] = []
        self._reset_stats()

    # --- set-up ------------------------------------------------------------------

    def _wrap(self) -> None:
        if self.config.parallel == "ddp":
            self.engine = wrap_ddp(self.model)

    def _trainable(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = param_groups(self.model, lr=c.lr, router_lr=c.router_lr, weight_decay=c.weight_decay)
        for g in groups:
            g["base_lr"] = g["lr"]
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)

    def _reset_stats(self) -> None:
        T = len(self.task_names)
        self._stats = torch.zeros(4, T, dtype=torch.float64, device=self.device)  # loss, tok acc, exact, count

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        frac = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        if c.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    def _mta_layers(self):
        return [layer for _, layer in routed_layers(self.model) if hasattr(layer, "set_stage")]

    def _maybe_stage2(self) -> None:
        at = self.config.mta_stage2_at
        if at is None or self.step < at:
            return
        layers = self._mta_layers()
        if not layers:
            raise ValueError("mta_stage2_at: the model has no MTA layers (inject with router='mta')")
        if all(layer.mta_stage == 2 for layer in layers):
            return
        if self.config.parallel == "fsdp":
            raise ValueError("mta_stage2_at: switching stages inside one FSDP2 run is not supported; run stage 1, "
                             "then stage 2 as a second run from the stage-1 adapter (recipe 'mta-stage2')")
        mta_stage2(self.model)
        self._wrap()  # DDP registers the (new) trainable parameters
        self.optimizer = self._make_optimizer()

    # --- one step ----------------------------------------------------------------

    def _route_ids(self, tasks: torch.Tensor) -> torch.Tensor:
        if self.config.task_routing == "shared":
            return torch.zeros_like(tasks)
        return tasks + self.config.task_offset

    def _forward(self, engine, examples, route_ids, noise_rows=None):
        batch = {k: v.to(self.device) for k, v in collate(examples, pad_id=self.pad_id,
                                                          encoder_decoder=self.encoder_decoder).items()}
        labels = batch["labels"]
        if not self.encoder_decoder:
            del batch["labels"]  # the loss is computed here, per example
        with routing(self.model, route_ids.to(self.device), noise_rows=noise_rows):
            out = engine(**batch)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return example_metrics(logits, labels, encoder_decoder=self.encoder_decoder)

    def next_batch(self):
        """This rank's part of the next global batch: ``(task ids, examples, first row)``."""
        tasks, examples = self.sampler.sample(self.config.batch_size)
        lo = self.rank * self.local_batch
        tasks = tasks[lo:lo + self.local_batch]
        examples = examples[lo:lo + self.local_batch]
        data = [self.train_tasks[self.task_names[t]][i] for t, i in zip(tasks.tolist(), examples.tolist())]
        return tasks, data, lo

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns this rank's loss (a detached tensor, no host sync)."""
        self._maybe_stage2()
        factor = self._lr_factor(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.model.train()
        tasks, data, lo = self.next_batch()
        noise_rows = (lo, self.config.batch_size) if self.world > 1 else None
        loss_ex, acc_ex, exact_ex = self._forward(self.engine, data, self._route_ids(tasks), noise_rows)
        loss = loss_ex.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        t = tasks.to(self.device)
        stats = torch.stack([loss_ex.detach(), acc_ex, exact_ex, torch.ones_like(acc_ex)]).double()
        self._stats.index_add_(1, t, stats)
        self._pending.append(loss.detach())
        return loss.detach()

    # --- logging -----------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def _flush_losses(self) -> None:
        if not self._pending:
            return
        losses = self._all_reduce(torch.stack(self._pending).double()) / self.world
        self.history["loss"].extend(float(v) for v in losses.cpu())
        self._pending = []

    def _log_point(self) -> dict:
        self._flush_losses()
        stats = self._all_reduce(self._stats.clone()).cpu()
        self._reset_stats()
        count = stats[3].clamp(min=1)
        rec = {"step": self.step, "loss": self.history["loss"][-1],
               "tasks": {n: {"loss": float(stats[0, i] / count[i]), "token_acc": float(stats[1, i] / count[i]),
                             "exact": float(stats[2, i] / count[i]), "examples": int(stats[3, i])}
                         for i, n in enumerate(self.task_names)}}
        self.history["log"].append(rec)
        if self.rank == 0:
            self.log(f"step {self.step:6d}  loss {rec['loss']:.4f}  " + "  ".join(
                f"{n} {v['loss']:.3f}/{v['token_acc']:.2f}" for n, v in rec["tasks"].items()) +
                "   (per task: train loss/token acc since last log)")
            self._write_jsonl({"kind": "train", **rec})
        return rec

    def _write_jsonl(self, rec: dict) -> None:
        if self.config.output_dir and self.rank == 0:
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # --- evaluation --------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_tasks: Optional[Mapping[str, Sequence[Mapping]]] = None) -> Dict[str, dict]:
        """Per task: mean loss, token accuracy and exact match (teacher-forced greedy) in eval mode.

        Every rank evaluates every example (FSDP2 needs all ranks in each forward).
        """
        tasks = eval_tasks if eval_tasks is not None else self.eval_tasks
        if not tasks:
            raise ValueError("eval_tasks: nothing to evaluate (pass eval_tasks)")
        unknown = [n for n in tasks if n not in self.task_names]
        if unknown:
            raise ValueError(f"eval_tasks: tasks {unknown} are not among the training tasks {self.task_names}")
        was_training = self.model.training
        self.model.eval()
        out = {}
        try:
            for name, data in tasks.items():
                t = self.task_names.index(name)
                sums = torch.zeros(3, dtype=torch.float64)
                for i in range(0, len(data), self.config.eval_batch_size):
                    chunk = list(data[i:i + self.config.eval_batch_size])
                    ids = self._route_ids(torch.full((len(chunk),), t, dtype=torch.long))
                    metrics = self._forward(self.model, chunk, ids)
                    sums += torch.stack([m.double().sum().cpu() for m in metrics])
                n = max(1, len(data))
                out[name] = {"loss": float(sums[0] / n), "token_acc": float(sums[1] / n),
                             "exact": float(sums[2] / n), "examples": len(data)}
        finally:
            self.model.train(was_training)
        return out

    def _eval_point(self) -> None:
        res = self.evaluate()
        self.history["eval"].append({"step": self.step, "tasks": res})
        if self.rank == 0:
            self.log(f"eval step {self.step}: " + "  ".join(
                f"{n} loss {v['loss']:.3f} exact {v['exact']:.3f}" for n, v in res.items()))
            self._write_jsonl({"kind": "eval", "step": self.step, "tasks": res})

    # --- the loop ----------------------------------------------------------------

    def train(self, resume_from: Optional[str] = None) -> Dict[str, list]:
        """Train up to ``config.steps`` steps (from a checkpoint directory if given); returns the history."""
        from tqdm.auto import tqdm

        if resume_from is not None:
            self.load_checkpoint(resume_from)
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress or self.rank != 0,
                   desc="routedlora", dynamic_ncols=True)
        try:
            while self.step < c.steps:
                self.train_step()
                bar.update(1)
                if c.log_every and (self.step % c.log_every == 0 or self.step == c.steps or self.step == 1):
                    rec = self._log_point()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if c.eval_every and self.eval_tasks and self.step % c.eval_every == 0:
                    self._eval_point()
                if c.save_every and c.output_dir and self.step % c.save_every == 0:
                    self.save_checkpoint(os.path.join(c.output_dir, f"step_{self.step}"))
        finally:
            bar.close()
        self._flush_losses()
        if c.eval_every and self.eval_tasks and (not self.history["eval"] or
                                                 self.history["eval"][-1]["step"] != self.step):
            self._eval_point()
        if c.output_dir:
            self.save_checkpoint(os.path.join(c.output_dir, "final"))
        return self.history

    # --- checkpoints -------------------------------------------------------------

    def _adapter_params(self):
        for name, layer in routed_layers(self.model):
            for p, t in layer.adapter_state().items():
                yield f"{name}.{p}", t

    def save_checkpoint(self, path: str) -> None:
        """Write ``adapter.safetensors`` (rank 0; whole tensors) and ``trainer_state.rank<r>.pt`` (every rank)."""
        from safetensors.torch import save_file

        self._flush_losses()
        tensors = {k: full_tensor(t.detach()).contiguous().cpu() for k, t in self._adapter_params()}
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            stages = {name: getattr(layer, "mta_stage", 1) for name, layer in routed_layers(self.model)}
            meta = {"format": _FORMAT, "config": model_config(self.model).to_json(), "stages": json.dumps(stages)}
            save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata=meta)
        if self.world > 1:
            dist.barrier()
        os.makedirs(path, exist_ok=True)
        state = {
            "step": self.step, "world_size": self.world, "task_names": self.task_names,
            "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "layer_rng": {name: layer.noise_generator_state() for name, layer in routed_layers(self.model)},
            "history": self.history, "stats": self._stats.cpu(), "config": dataclasses.asdict(self.config),
        }
        torch.save(state, os.path.join(path, f"trainer_state.rank{self.rank}.pt"))
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        """Restore adapter, optimizer, sampler, RNG states and step from :meth:`save_checkpoint`'s directory."""
        from safetensors import safe_open

        state_file = os.path.join(path, f"trainer_state.rank{self.rank}.pt")
        adapter_file = os.path.join(path, ADAPTER_FILE)
        for f in (state_file, adapter_file):
            if not os.path.isfile(f):
                raise ValueError(f"resume_from: {path} has no {os.path.basename(f)}")
        try:
            # tensors and plain containers only: a checkpoint directory never runs code
            state = torch.load(state_file, weights_only=True)
        except Exception as e:
            raise ValueError(f"resume_from: {state_file} is not a trainer state this version can read safely "
                             f"(only tensors and plain data are loaded, nothing is unpickled): "
                             f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        if state["world_size"] != self.world:
            raise ValueError(f"resume_from: saved with {state['world_size']} ranks, resuming with {self.world}")
        if state["task_names"] != self.task_names:
            raise ValueError(f"resume_from: saved for tasks {state['task_names']}, training {self.task_names}")
        with safe_open(adapter_file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        own = dict(self._adapter_params())
        if sorted(own) != sorted(tensors):
            raise ValueError(f"resume_from: adapter names in {adapter_file} differ from the model's")
        for k, p in own.items():
            if tuple(p.shape) != tuple(tensors[k].shape):
                raise ValueError(f"resume_from: {k} has shape {tuple(tensors[k].shape)} in the file, "
                                 f"{tuple(p.shape)} in the model")
        for k, p in own.items():
            copy_full_(p, tensors[k])
        stages = json.loads(meta.get("stages", "{}"))
        changed = False
        for name, layer in routed_layers(self.model):
            if hasattr(layer, "set_stage") and layer.mta_stage != int(stages.get(name, 1)):
                layer.set_stage(int(stages.get(name, 1)))
                changed = True
        if changed:
            set_trainable(self.model)
            self._wrap()
            self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        for name, layer in routed_layers(self.model):
            gen_state = state["layer_rng"].get(name)
            if gen_state is not None:
                layer.set_noise_generator_state(gen_state)
        self.history = state["history"]
        self._stats = state["stats"].to(self.device)
        self._pending = []
        self.step = state["step"]


__all__ = ["ADAPTER_FILE", "MultiTaskTrainer", "SCHEDULES", "TASK_ROUTING", "TrainConfig", "example_metrics"]
