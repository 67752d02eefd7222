"""The mixed-task trainer: any Hugging Face causal or seq2seq LM with routed LoRA injected.

Every batch mixes tasks (each example draws its own task from a :class:`TaskSampler`);
the batch is routed with :func:`routedlora.routing`. The loss is the mean over examples
of each example's mean token loss on its target. Per-task loss, token accuracy and exact
match (all target tokens right under teacher forcing, which is exactly greedy decoding
being right) are logged every ``log_every`` steps, and per-step losses are kept in
``history["loss"]``.

Checkpoints hold only the adapter (``adapter.safetensors``, loadable with
:func:`routedlora.load_adapter`) and the trainer state (optimizer, sampler, RNG states,
step) per rank: resuming replays exactly the loss sequence of an uninterrupted run. A
``manifest.json`` lists each file's sha256 and size and the configs; a checkpoint is
written to a hidden sibling directory and renamed into place, and resuming checks all
of it before it changes anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import _FORMAT, adapter_state_dict
from ..durable import fsync_dir, install, make_sibling_dir, write_durably
from ..inject import model_config, routed_layers, routing, set_trainable
from ..recipes import mta_stage2, param_groups
from .checkpoint_files import (ABSENT, ADAPTER_FILE, CHECKPOINT_FORMAT, FREE_ROUTED_FIELDS, FREE_TRAIN_FIELDS,
                               MANIFEST_FILE, STRUCTURAL_ROUTED_FIELDS, check_optimizer_state, check_replaceable,
                               file_digest, raise_on_any_rank, read_manifest, safetensors_metadata, state_file,
                               valid_generator_state, verified_bytes, version)
from .data import collate
from .distributed import (PARALLEL, broadcast_object, copy_full_, first_error, full_tensor, rank_world,
                          shard_fsdp2, wrap_ddp)
from .sampler import MIXING, TaskSampler

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
        # Checked here, not at first use: a bad value found at step 10,000 (or only in the
        # resumed run) costs the whole run.
        for name in ("steps", "batch_size", "eval_batch_size"):
            _check_int(self, name, low=1)
        for name in ("warmup_steps", "task_offset", "log_every"):
            _check_int(self, name, low=0)
        for name in ("eval_every", "save_every", "mta_stage2_at"):
            _check_int(self, name, low=0, optional=True)
        _check_int(self, "mixing_cap", low=1, optional=True)
        _check_int(self, "seed", low=0, high=2 ** 63 - 1)
        for name in ("lr", "mixing_temperature"):
            _check_number(self, name, positive=True)
        for name in ("router_lr", "max_grad_norm"):
            _check_number(self, name, positive=True, optional=True)
        _check_number(self, "weight_decay", positive=False)
        for name, choices in (("schedule", SCHEDULES), ("mixing", MIXING), ("task_routing", TASK_ROUTING),
                              ("parallel", PARALLEL)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {v!r}")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
                raise ValueError(f"output_dir: expected a non-empty path or None, got {self.output_dir!r}")
            self.output_dir = os.fspath(self.output_dir)
            if not isinstance(self.output_dir, str):
                raise ValueError(f"output_dir: expected a text path, got {self.output_dir!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress: expected True or False, got {self.progress!r}")


def _check_int(config, name: str, *, low: int, high: Optional[int] = None, optional: bool = False) -> None:
    v = getattr(config, name)
    if v is None and optional:
        return
    # numpy / torch integer scalars are accepted and stored as int (the config goes to JSON)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low or (high is not None and v > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {bound}{' or None' if optional else ''}, got {v!r}")
    setattr(config, name, int(v))


def _check_number(config, name: str, *, positive: bool, optional: bool = False) -> None:
    v = getattr(config, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (
            positive and v == 0):
        what = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name}: expected {what}{' or None' if optional else ''}, got {v!r}")
    setattr(config, name, v if isinstance(v, int) else float(v))


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

    def train(self, resume_from: Optional[str] = None, *, allow_config_change: bool = False) -> Dict[str, list]:
        """Train up to ``config.steps`` steps (from a checkpoint directory if given); returns the history.

        ``allow_config_change``: resume even though options that change the computation
        differ from the checkpoint's (see :meth:`load_checkpoint`).
        """
        from tqdm.auto import tqdm

        if resume_from is not None:
            self.load_checkpoint(resume_from, allow_config_change=allow_config_change)
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
        # each routing table shared by several layers (router_granularity) once, as save_adapter stores it
        return adapter_state_dict(self.model).items()

    def _stages(self) -> Dict[str, int]:
        return {name: getattr(layer, "mta_stage", 1) for name, layer in routed_layers(self.model)}

    def save_checkpoint(self, path: str) -> None:
        """Write a checkpoint directory atomically: ``path`` holds the old or the new one, never a mix.

        Everything goes to a hidden sibling directory first: ``adapter.safetensors`` (rank 0;
        whole tensors), ``trainer_state.rank<r>.pt`` (every rank), then ``manifest.json``
        (sha256 and size of each file, step, world size, routed and training configs), each
        fsynced; the directory then takes ``path``'s place in one rename (an existing
        checkpoint at ``path`` is swapped out and deleted). An existing ``path`` that holds
        anything but checkpoint files is refused. With several ranks, ``path`` must be on a
        file system every rank sees, and every rank must call this.
        """
        from safetensors.torch import save as safetensors_bytes

        self._flush_losses()
        tensors = {k: full_tensor(t.detach()).contiguous().cpu() for k, t in self._adapter_params()}
        path = os.path.normpath(os.fspath(path))
        parent, name = os.path.split(path)
        parent = parent or "."
        tmp, err = None, None
        if self.rank == 0:
            try:
                check_replaceable(path)
                os.makedirs(parent, exist_ok=True)
                tmp = make_sibling_dir(parent, f".{name}.tmp-{os.getpid()}-")
            except (OSError, ValueError) as e:
                err = e
        raise_on_any_rank(err, path)
        tmp = broadcast_object(tmp)
        try:
            if self.rank == 0:
                meta = {"format": _FORMAT, "config": model_config(self.model).to_json(),
                        "stages": json.dumps(self._stages())}
                write_durably(os.path.join(tmp, ADAPTER_FILE), safetensors_bytes(tensors, metadata=meta))
            state = {
                "step": self.step, "world_size": self.world, "task_names": self.task_names,
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "layer_rng": {name: layer.noise_generator_state() for name, layer in routed_layers(self.model)},
                "history": self.history, "stats": self._stats.cpu(), "config": dataclasses.asdict(self.config),
            }
            write_durably(os.path.join(tmp, state_file(self.rank)), lambda f: torch.save(state, f))
            err = None
        except Exception as e:  # any failure: every rank must stop, and the temporary directory go
            err = e

        def cleanup():
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

        try:
            raise_on_any_rank(err, path, cleanup)
            err = None
            if self.rank == 0:
                try:
                    self._write_manifest(tmp)
                    install(tmp, path)
                except Exception as e:
                    err = e
            raise_on_any_rank(err, path, cleanup)
        except BaseException:  # KeyboardInterrupt too: no half-written directory stays behind
            cleanup()
            raise

    def _write_manifest(self, tmp: str) -> None:
        names = sorted(os.listdir(tmp))
        expected = [ADAPTER_FILE] + [state_file(r) for r in range(self.world)]
        missing = [n for n in expected if n not in names]
        if missing:
            raise OSError(f"{tmp}: {missing} not written (every rank must see the same file system)")
        manifest = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "world_size": self.world,
            "task_names": list(self.task_names),
            "routed_config": json.loads(model_config(self.model).to_json()),
            "train_config": json.loads(json.dumps(dataclasses.asdict(self.config))),
            "files": {n: file_digest(os.path.join(tmp, n)) for n in names},
            "versions": {"routedlora": version(), "torch": torch.__version__},
        }
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        write_durably(os.path.join(tmp, MANIFEST_FILE), text.encode())
        fsync_dir(tmp)

    def load_checkpoint(self, path: str, *, allow_config_change: bool = False) -> None:
        """Restore adapter, optimizer, sampler, RNG states and step from :meth:`save_checkpoint`'s directory.

        Everything is checked before anything changes; on any problem a ``ValueError``
        naming the file and the problem is raised (``FileNotFoundError`` for a missing
        directory) and the trainer and model are as they were: the manifest and each file's
        sha256 and size, step, world size, task names, adapter names and shapes, MTA stages,
        sampler, optimizer and RNG states, and the configuration. A routed-config field
        (``alpha``, ``temperature``, ...) or a training option that changes the computation
        (``lr``, ``batch_size``, ``mixing``, ... and ``steps`` under a decaying schedule)
        that differs from the checkpoint's is refused unless ``allow_config_change``; the
        fields that decide the adapter's structure (``r``, ``n_skills``, ``router``, ...)
        are refused regardless. A model with a merged task is refused.
        """
        err, plan = None, None
        try:
            plan = self._check_checkpoint(os.fspath(path), allow_config_change)
        except Exception as e:  # noqa: BLE001 - every rank must hear of any failure, whatever its kind
            err = e
        if self.world > 1:  # one rank's bad file must stop every rank before any of them loads
            msg = first_error(None if err is None else str(err))
            if err is None and msg is not None:
                raise ValueError(msg)
        if err is not None:
            raise err
        self._apply_checkpoint(plan, allow_config_change)

    def _check_checkpoint(self, path: str, allow_config_change: bool) -> dict:
        import io

        from safetensors.torch import load as safetensors_load

        merged = [(name, layer.merged_task) for name, layer in routed_layers(self.model)
                  if layer.merged_task is not None]
        if merged:
            raise ValueError(f"resume_from: {path}: not loaded: the model has task {merged[0][1]} merged into "
                             f"{merged[0][0]} ({len(merged)} layers); unmerge it (routedlora.unmerge) before "
                             f"resuming training")
        manifest = read_manifest(path)
        mpath = os.path.join(path, MANIFEST_FILE)
        if manifest["world_size"] != self.world:
            raise ValueError(f"resume_from: {mpath}: saved with {manifest['world_size']} ranks, resuming with "
                             f"{self.world} (resuming needs the same number of ranks)")
        if manifest["task_names"] != self.task_names:
            raise ValueError(f"resume_from: {mpath}: saved for tasks {manifest['task_names']}, "
                             f"training {self.task_names}")
        structural, changed = self._config_differences(manifest)
        if structural:
            raise ValueError(f"resume_from: {mpath}: the checkpoint's adapter is built differently and cannot "
                             f"be loaded into this model (no override): {'; '.join(structural)}")
        if changed and not allow_config_change:
            raise ValueError(f"resume_from: {mpath}: the configuration differs from the checkpoint's: "
                             f"{'; '.join(changed)} (pass allow_config_change=True, on the command line "
                             f"--resume-allow-config-change, to go on with the new values)")
        state_name = state_file(self.rank)
        adapter_blob = verified_bytes(path, manifest, ADAPTER_FILE)
        state_blob = verified_bytes(path, manifest, state_name)
        state_path, adapter_path = os.path.join(path, state_name), os.path.join(path, ADAPTER_FILE)
        try:
            # tensors and plain containers only: a checkpoint directory never runs code
            state = torch.load(io.BytesIO(state_blob), weights_only=True)
        except Exception as e:
            raise ValueError(f"resume_from: {state_path} is not a trainer state this version can read safely "
                             f"(only tensors and plain data are loaded, nothing is unpickled): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self._check_state(state, manifest, state_path)
        try:
            tensors = safetensors_load(adapter_blob)
            meta = safetensors_metadata(adapter_blob)
        except Exception as e:
            raise ValueError(f"resume_from: {adapter_path} is not a safetensors file: "
                             f"{type(e).__name__}: {e}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"resume_from: {adapter_path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
        try:
            adapter_config = json.loads(meta.get("config", "null"))
        except json.JSONDecodeError:
            adapter_config = None
        if adapter_config != manifest["routed_config"]:
            raise ValueError(f"resume_from: {adapter_path}: its config differs from the manifest's")
        own = dict(self._adapter_params())
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"resume_from: {adapter_path}: adapter names differ from the model's: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, p in own.items():
            if tuple(p.shape) != tuple(tensors[k].shape):
                raise ValueError(f"resume_from: {adapter_path}: {k} has shape {tuple(tensors[k].shape)} in the "
                                 f"file, {tuple(p.shape)} in the model")
        stages = self._check_stages(meta.get("stages", "{}"), adapter_path)
        groups, stage_change = self._groups_after(stages)
        names = {id(p): n for n, p in self.model.named_parameters()}
        check_optimizer_state(state["optimizer"], groups, names, state_path)
        try:
            self.sampler.check_state_dict(state["sampler"], allow_new_mixing=allow_config_change)
        except ValueError as e:
            raise ValueError(f"resume_from: {state_path}: {e}") from None
        return {"tensors": tensors, "own": own, "stages": stages if stage_change else None, "state": state,
                "changed": changed}

    def _config_differences(self, manifest: dict):
        """``(structural, other)``: ``"name: saved X, now Y"`` for each field that differs."""
        def show(v):
            return "(absent)" if v is ABSENT else repr(v)

        structural, other = [], []
        saved, now = manifest["routed_config"], json.loads(model_config(self.model).to_json())
        for k in sorted(set(saved) | set(now)):
            a, b = saved.get(k, ABSENT), now.get(k, ABSENT)
            if k in FREE_ROUTED_FIELDS or a == b:
                continue
            known = k in now and k in saved
            (structural if k in STRUCTURAL_ROUTED_FIELDS or not known else other).append(
                f"routed.{k}: saved {show(a)}, now {show(b)}")
        saved, now = manifest["train_config"], json.loads(json.dumps(dataclasses.asdict(self.config)))
        decaying = (saved.get("schedule"), now.get("schedule")) != ("constant", "constant")
        for k in sorted(set(saved) | set(now)):
            a, b = saved.get(k, ABSENT), now.get(k, ABSENT)
            if a == b or (k in FREE_TRAIN_FIELDS and not (k == "steps" and decaying)):
                continue
            line = f"train.{k}: saved {show(a)}, now {show(b)}"
            (structural if k == "parallel" and "fsdp" in (a, b) else other).append(line)
        return structural, other

    def _check_state(self, state, manifest: dict, where: str) -> None:
        def bad(problem):
            return ValueError(f"resume_from: {where}: {problem}")

        if not isinstance(state, dict):
            raise bad(f"expected a dict, got {type(state).__name__}")
        kinds = {"step": int, "world_size": int, "task_names": list, "optimizer": dict, "sampler": dict,
                 "torch_rng": torch.Tensor, "layer_rng": dict, "history": dict, "stats": torch.Tensor}
        for key, kind in kinds.items():
            if key not in state:
                raise bad(f"lacks {key!r}")
            if not isinstance(state[key], kind) or isinstance(state[key], bool):
                raise bad(f"{key!r} is a {type(state[key]).__name__}, expected {kind.__name__}")
        if state["step"] != manifest["step"]:
            raise bad(f"step {state['step']} differs from the manifest's step {manifest['step']}")
        if state["world_size"] != manifest["world_size"] or state["task_names"] != manifest["task_names"]:
            raise bad("world size or task names differ from the manifest's")
        if state["torch_rng"].dtype != torch.uint8 or not valid_generator_state(state["torch_rng"]):
            raise bad("torch_rng is not a CPU generator state")
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and not (isinstance(cuda_rng, torch.Tensor) and cuda_rng.dtype == torch.uint8):
            raise bad("cuda_rng is not a generator state")
        for name, v in state["layer_rng"].items():
            if v is not None and not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.long):
                raise bad(f"layer_rng[{name!r}] is not a 0-d int64 batch counter")
        hist = state["history"]
        if not all(isinstance(hist.get(k), list) for k in ("loss", "log", "eval")):
            raise bad("history lacks the 'loss', 'log' and 'eval' lists")
        T = len(self.task_names)
        if tuple(state["stats"].shape) != (4, T) or state["stats"].dtype != torch.float64:
            raise bad(f"stats has shape {tuple(state['stats'].shape)}, expected (4, {T}) float64")

    def _check_stages(self, text: str, where: str) -> Dict[str, int]:
        layers = dict(routed_layers(self.model))
        try:
            stages = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            stages = None
        if not isinstance(stages, dict):
            raise ValueError(f"resume_from: {where}: the MTA stages metadata is not a JSON object")
        for name, stage in stages.items():
            if name not in layers:
                raise ValueError(f"resume_from: {where}: MTA stages name {name!r}, not a routed layer of the model")
            if isinstance(stage, bool) or stage not in ((1, 2) if hasattr(layers[name], "set_stage") else (1,)):
                raise ValueError(f"resume_from: {where}: MTA stage {stage!r} of {name} is not valid "
                                 f"({'1 or 2' if hasattr(layers[name], 'set_stage') else '1: not an MTA layer'})")
        return {name: int(stages.get(name, 1)) for name in layers}

    def _groups_after(self, stages: Dict[str, int]):
        """The optimizer's parameter groups once ``stages`` are set, and whether they differ from now."""
        layers = [(name, layer) for name, layer in routed_layers(self.model) if hasattr(layer, "set_stage")]
        if all(layer.mta_stage == stages[name] for name, layer in layers):
            return [list(g["params"]) for g in self.optimizer.param_groups], False
        # Set the stages for a moment to ask param_groups, then put everything back: the
        # rules of which parameter trains in which stage stay in one place (mta.py, recipes.py).
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        before = [(layer, layer.mta_stage, layer.trainable_params) for _, layer in layers]
        try:
            for name, layer in layers:
                layer.set_stage(stages[name])
            set_trainable(self.model)
            c = self.config
            groups = param_groups(self.model, lr=c.lr, router_lr=c.router_lr, weight_decay=c.weight_decay)
            return [list(g["params"]) for g in groups], True
        finally:
            for layer, stage, names in before:
                layer.mta_stage, layer.trainable_params = stage, names
            for p, flag in flags:
                p.requires_grad_(flag)

    def _apply_checkpoint(self, plan: dict, allow_config_change: bool) -> None:
        for k, p in plan["own"].items():
            copy_full_(p, plan["tensors"][k])
        if plan["stages"] is not None:
            for name, layer in routed_layers(self.model):
                if hasattr(layer, "set_stage"):
                    layer.set_stage(plan["stages"][name])
            set_trainable(self.model)
            self._wrap()
            self.optimizer = self._make_optimizer()
        state = plan["state"]
        # the saved groups carry the saved lr, weight decay, ...: the current config's win
        # (identical without a config change; the new values with allow_config_change)
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, hyper in zip(self.optimizer.param_groups, current):
            g.update(hyper)
        self.sampler.load_state_dict(state["sampler"], allow_new_mixing=allow_config_change)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        for name, layer in routed_layers(self.model):
            gen_state = state["layer_rng"].get(name)
            if gen_state is not None and layer.config.seed is not None:
                layer.set_noise_generator_state(gen_state)
        self.history = state["history"]
        self._stats = state["stats"].to(self.device)
        self._pending = []
        self.step = state["step"]
        if plan["changed"] and self.rank == 0:
            self.log("resume: configuration changed from the checkpoint's (allow_config_change): "
                     + "; ".join(plan["changed"]))



__all__ = ["ADAPTER_FILE", "CHECKPOINT_FORMAT", "MANIFEST_FILE", "MultiTaskTrainer", "SCHEDULES", "TASK_ROUTING",
           "TrainConfig", "example_metrics", "read_manifest"]
