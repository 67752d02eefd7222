"""RoutedLoraLinear: the drop-in routed LoRA replacement of an ``nn.Linear``."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .config import RoutedLoraConfig
from .backends import resolve_backend
from .ops import routed_lora
from .routers import Routing, cpoly_route, gumbel_uniform, poly_route, softmax_route, topk_route
from .validation import check_index_range, check_tensor, values_checkable

def _recomputing() -> bool:
    """True while autograd runs a backward pass: activation checkpointing re-runs forward here."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


_NO_TASKS = ("no task ids: call the model inside `with routedlora.routing(model, task_ids):` "
             "or pass task_ids= to the layer")


class RoutedLoraLinear(nn.Module):
    """``y = base(x) + γ · Δ(x)`` with skills routed per task (DESIGN.md §1).

    Parameters (PEFT Poly layout): ``lora_A (h, m, in/h, r)``, ``lora_B (h, m, r, out/h)``,
    ``router_logits (n_tasks, h, m)``. The wrapped ``base_layer`` is frozen.

    Task ids come from ``forward(x, task_ids=...)`` or from the enclosing
    :func:`routedlora.routing` context. Accepted shapes, for ``x`` of shape
    ``(B, S..., in)`` (or ``(N, in)``, where every token is its own sequence):
    a scalar (one task for the batch), ``(B,)`` (one per sequence), or ``x.shape[:-1]``
    (one per token). Gumbel noise is drawn once per sequence, as in PEFT Poly.
    """

    def __init__(self, base_layer: nn.Linear, config: Optional[RoutedLoraConfig] = None, *,
                 layer_index: int = 0, **kwargs):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected nn.Linear, got {type(base_layer).__name__}")
        if config is None:
            kwargs.setdefault("target_modules", ["<direct>"])
            config = RoutedLoraConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config or keyword options, not both (got {sorted(kwargs)})")
        self.check_compatible(base_layer, config)
        self.config = config
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.layer_index = layer_index
        self.merged_task: Optional[int] = None
        self.disabled = False
        self._state = None  # set by routedlora.routing()
        # What the last forward under grad routed with and where its noise started, so
        # that a checkpointed forward re-run during backward (after the routing block
        # may have closed) sees the same tasks and draws the same noise.
        self._last_state = None
        self._noise_state: Optional[Tensor] = None
        self._generator: Optional[torch.Generator] = None
        # Which adapter parameters train (see routedlora.set_trainable); recipes change it.
        self.trainable_params: Tuple[str, ...] = ("lora_A", "lora_B", "router_logits")
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        h, m, r = config.n_heads, config.total_skills, config.r
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.empty(h, m, self.in_features // h, r, **kw))
        self.lora_B = nn.Parameter(torch.empty(h, m, r, self.out_features // h, **kw))
        self.router_logits = nn.Parameter(torch.empty(config.n_tasks, h, m, **kw))
        self.reset_parameters()

    @staticmethod
    def check_compatible(base_layer: nn.Linear, config: RoutedLoraConfig, name: str = "base_layer") -> None:
        h = config.n_heads
        if base_layer.in_features % h or base_layer.out_features % h:
            raise ValueError(f"n_heads: {h} heads must divide in_features={base_layer.in_features} and "
                             f"out_features={base_layer.out_features} of {name}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        # PEFT Poly's init: A like nn.Linear's default (kaiming-uniform, a=sqrt(5)),
        # i.e. U(±1/sqrt(fan_in)) with fan_in the per-head input width.
        bound = 1.0 / math.sqrt(self.lora_A.shape[2])
        self.lora_A.uniform_(-bound, bound)
        if cfg.init_weights:
            self.lora_B.zero_()
        else:
            self.lora_B.uniform_(-1.0 / math.sqrt(cfg.r), 1.0 / math.sqrt(cfg.r))
        self.router_logits.uniform_(-1e-3, 1e-3)
        if cfg.router == "cpoly":
            # Task-private allocation starts as the one-hot ownership pattern.
            spec = self.router_logits[..., cfg.n_skills:]
            spec.zero_()
            for t in range(cfg.n_tasks):
                spec[t, :, t * cfg.n_specific:(t + 1) * cfg.n_specific] = 1.0

    def trainable_names(self) -> Tuple[str, ...]:
        return self.trainable_params

    def adapter_state(self) -> dict:
        """The adapter's own parameters (everything but the frozen base layer), by name."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    # --- routing -----------------------------------------------------------------

    # Model code reads these off the modules it calls (T5 reads `wo.weight.dtype`).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def n_tasks(self) -> int:
        return self.router_logits.shape[0]

    @property
    def scale(self) -> float:
        return self.config.scale

    def _task_ids(self, x: Tensor, task_ids) -> Tensor:
        state = self._state
        if state is None and task_ids is None and _recomputing():
            state = self._last_state
        elif state is not None and torch.is_grad_enabled():
            self._last_state = state
        if task_ids is None:
            if state is None:
                raise ValueError(_NO_TASKS)
            ids = state.task_ids
        else:
            ids = torch.as_tensor(task_ids, device=self.router_logits.device)
            check_tensor("task_ids", ids, integer=True)
            check_index_range("task_ids", ids, self.n_tasks, "task id")
        batch = x.shape[0] if x.dim() > 1 else 1
        if ids.dim() >= 1 and state is not None and state.expand > 1 and ids.shape[0] * state.expand == batch:
            # generate() repeats each sequence num_beams times, beams contiguous.
            ids = ids.repeat_interleave(state.expand, dim=0)
        return ids.to(self.router_logits.device)

    def _rows(self, x: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
        """Routing rows of a batch: (task of each row, example of each row, row of each token, B)."""
        lead = x.shape[:-1]
        N = math.prod(lead)
        B = lead[0] if len(lead) >= 1 else 1
        S = N // B if B else 0
        dev = ids.device
        if ids.dim() == 0:
            ids = ids.expand(B)
        if ids.shape == lead[:1] or (len(lead) == 0 and ids.numel() == 1):
            rows_task = ids.reshape(-1)
            row_example = torch.arange(rows_task.shape[0], device=dev)
            route_ids = row_example.repeat_interleave(S) if S != 1 else row_example
        elif ids.shape == lead:
            rows_task = ids.reshape(-1)
            row_example = torch.arange(B, device=dev).repeat_interleave(S)
            route_ids = torch.arange(N, device=dev)
        else:
            raise ValueError(f"task_ids: expected a scalar, shape ({B},) (one per sequence) or "
                             f"{tuple(lead)} (one per token) for input of shape {tuple(x.shape)}, "
                             f"got shape {tuple(ids.shape)}")
        return rows_task, row_example, route_ids, B

    def _generator_for(self, device) -> Optional[torch.Generator]:
        if self.config.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.config.seed + self.layer_index)
        return self._generator

    def _noise_generator(self, device) -> Optional[torch.Generator]:
        """The generator noise is drawn from, rewound to the last forward's state when checkpointing re-runs it."""
        gen = self._generator_for(device)
        if gen is not None:
            if _recomputing() and self._noise_state is not None:
                gen.set_state(self._noise_state)
            else:
                self._noise_state = gen.get_state()
        return gen

    def _noise(self, B: int, row_example: Tensor, heads: int, skills: int, device) -> Optional[Tensor]:
        if not (self.training and self.config.gumbel):
            return None
        gen = self._noise_generator(device)
        rows = self._noise_rows()
        if rows is None:
            u = gumbel_uniform((B, heads, skills), generator=gen, device=device)
        else:
            # Data parallel: draw the noise of the whole global batch (same generator
            # state on every rank) and keep this rank's rows, so that each example
            # gets the noise it would get in a single-process run.
            start, total = rows
            if start + B > total:
                raise ValueError(f"noise_rows: rows [{start}, {start + B}) of this batch exceed the global "
                                 f"batch of {total}")
            u = gumbel_uniform((total, heads, skills), generator=gen, device=device)[start:start + B]
        return u if row_example.shape[0] == B else u[row_example]

    def _kernel_route(self, rows_task: Tensor, row_example: Tensor) -> Optional[Routing]:
        """Routing in one Triton kernel (backends triton and cuda, routers poly/softmax/topk/mta), else None.

        Gumbel noise then comes from a seed drawn from the layer's generator (or torch's)
        and Philox keyed by (example, head, skill): the same distribution as the torch
        routers, not the same draws.
        """
        cfg = self.config
        if cfg.backend not in ("triton", "cuda") or cfg.router not in ("poly", "softmax", "topk", "mta"):
            return None
        device = self.router_logits.device
        backend = resolve_backend(cfg.backend, device)
        seed, ex_offset = None, 0
        if cfg.router == "poly" and self.training and cfg.gumbel:
            gen = self._noise_generator(device)
            seed = torch.randint(0, 2**62, (1,), generator=gen, device=device, dtype=torch.int64)
            rows = self._noise_rows()
            ex_offset = rows[0] if rows is not None else 0
        kind = "topk" if cfg.router == "mta" else cfg.router
        idx, w = backend.route(self.router_logits, rows_task, row_example, kind=kind, seed=seed, k=cfg.top_k,
                               temperature=cfg.temperature, renormalize=cfg.renormalize, ex_offset=ex_offset)
        return Routing(idx, w)

    def _noise_rows(self) -> Optional[Tuple[int, int]]:
        state = self._state if self._state is not None else (self._last_state if _recomputing() else None)
        return getattr(state, "noise_rows", None)

    def noise_generator_state(self) -> Optional[Tensor]:
        """State of this layer's own Gumbel-noise generator (``config.seed`` set); ``None`` otherwise.

        With ``seed=None`` the noise comes from torch's global generator: save that instead.
        """
        gen = self._generator_for(self.router_logits.device)
        return None if gen is None else gen.get_state()

    def set_noise_generator_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`noise_generator_state` (exact resume of seeded noise)."""
        gen = self._generator_for(self.router_logits.device)
        if gen is None:
            raise ValueError("state: this layer has no own noise generator (config.seed is None)")
        gen.set_state(state)

    def route(self, rows_task: Tensor, row_example: Optional[Tensor] = None, B: Optional[int] = None) -> Routing:
        """Sparse routing rows for the given task of each row (float32 weights)."""
        cfg = self.config
        if row_example is None:
            row_example, B = torch.arange(rows_task.shape[0], device=rows_task.device), rows_task.shape[0]
        routing = self._kernel_route(rows_task, row_example)
        if routing is not None:
            return routing
        logits = self.router_logits[rows_task].float()
        R, h, m = logits.shape
        if cfg.router == "poly":
            return poly_route(logits, noise=self._noise(B, row_example, h, m, logits.device),
                              temperature=cfg.temperature)
        if cfg.router == "cpoly":
            noise = self._noise(B, row_example, h, cfg.n_skills, logits.device)
            return cpoly_route(logits, n_common=cfg.n_skills, noise=noise, temperature=cfg.temperature)
        if cfg.router == "softmax":
            return softmax_route(logits, temperature=cfg.temperature)
        return topk_route(logits, k=cfg.top_k, temperature=cfg.temperature, renormalize=cfg.renormalize)

    # --- forward -----------------------------------------------------------------

    def _check_input(self, x) -> None:
        check_tensor("x", x, floating=True)
        w = self.base_layer.weight
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"x: on {x.device}, but the layer is on {w.device}")
        # autocast legitimately feeds other dtypes to the base linear
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: dtype {x.dtype} differs from the layer's {w.dtype} (outside autocast)")

    def forward(self, x: Tensor, task_ids=None) -> Tensor:
        self._check_input(x)
        result = self.base_layer(x)
        if self.merged_task is not None and task_ids is not None:
            ids = torch.as_tensor(task_ids)
            if values_checkable(ids) and bool((ids != self.merged_task).any()):
                raise ValueError(f"task_ids: task {self.merged_task} is merged into this layer; route only that "
                                 "task or call routedlora.unmerge first")
        if self.disabled or self.merged_task is not None:
            return result
        ids = self._task_ids(x, task_ids)
        rows_task, row_example, route_ids, B = self._rows(x, ids)
        # The op adds into the base output in one pass when the dtypes agree.
        fused = result.dtype == self.lora_A.dtype
        base = result.reshape(-1, self.out_features) if fused else None
        out = self._routed(x, rows_task, row_example, route_ids, B, base)
        return out.view(result.shape) if fused else result + out.view(result.shape).to(result.dtype)

    def _lora_input(self, x: Tensor) -> Tensor:
        return self.dropout(x).reshape(-1, self.in_features).to(self.lora_A.dtype)

    def _routed(self, x, rows_task, row_example, route_ids, B, base) -> Tensor:
        """``base + γΔ`` (or ``γΔ`` when ``base`` is None) for the flattened tokens."""
        routing = self.route(rows_task, row_example, B)
        return routed_lora(self._lora_input(x), self.lora_A, self.lora_B, routing.idx, routing.w, route_ids,
                           scale=self.scale, combine=self.config.combine, base=base, backend=self.config.backend)

    # --- merging -----------------------------------------------------------------

    @torch.no_grad()
    def task_delta_weight(self, task_id: int) -> Tensor:
        """``γ (Â B̂)ᵀ`` of one task under evaluation routing, shape ``(out, in)``, float32."""
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < self.n_tasks:
            raise ValueError(f"task_id: expected an int in [0, {self.n_tasks}), got {task_id!r}")
        training = self.training
        self.eval()
        try:
            rows = torch.tensor([task_id], device=self.router_logits.device)
            routing = self.route(rows)
            eye = torch.eye(self.in_features, device=self.lora_A.device, dtype=torch.float32)
            delta = routed_lora(eye, self.lora_A.float(), self.lora_B.float(), routing.idx, routing.w,
                                torch.zeros(self.in_features, dtype=torch.long, device=eye.device),
                                scale=self.scale, combine=self.config.combine, backend="torch")
        finally:
            self.train(training)
        return delta.T

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_tasks={self.n_tasks}, "
                f"skills={self.lora_A.shape[1]}, r={c.r}, heads={c.n_heads}, router={c.router!r}, "
                f"combine={c.combine!r}, scale={self.scale:g}, backend={c.backend!r}")
