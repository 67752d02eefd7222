"""RoutedLoraLinear: the drop-in routed LoRA replacement of an ``nn.Linear``."""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import context
from .backends import resolve_backend
from .batch import BatchRows, UncheckedRows, as_task_ids, batch_rows
from .config import RoutedLoraConfig
from .ops import routed_lora
from .ops.routed_lora import compute_dtype
from .ops.rows import TokenRows
from .routers import (Routing, cpoly_fixed_specific, cpoly_route, dense_index, gumbel_uniform, hashed_bits,
                      hashed_uniform, poly_option_weights, poly_weights, private_route, topk_route)
from .validation import check_tensor, values_checkable


def is_conv1d(module) -> bool:
    """Whether ``module`` is Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its family).

    It computes ``x @ W + b`` with ``W`` stored ``(in, out)``, the transpose of ``nn.Linear``'s
    (PEFT's ``fan_in_fan_out``). Looked up among the loaded modules, so that routedlora never
    imports transformers: if transformers is not loaded, no model holds its Conv1D.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_supported_base(module) -> bool:
    """Whether a routed layer can wrap ``module``: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_features(module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if is_conv1d(module):
        # the weight is the truth: Conv1D's nf/nx attributes are not updated if it is replaced
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return module.in_features, module.out_features


SUPPORTED_BASES = "nn.Linear or transformers' Conv1D"


def _recomputing() -> bool:
    """True while autograd runs a backward pass: activation checkpointing re-runs forward here.

    Eager only: under ``torch.compile`` a checkpointed region is recomputed from the traced
    graph, which already holds this forward's task ids and noise counter.
    """
    if torch.compiler.is_compiling():
        return False
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
        if not is_supported_base(base_layer):
            raise TypeError(f"base_layer: expected {SUPPORTED_BASES}, got {type(base_layer).__name__}")
        if config is None:
            kwargs.setdefault("target_modules", ["<direct>"])
            config = RoutedLoraConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either config or keyword options, not both (got {sorted(kwargs)})")
        self.check_compatible(base_layer, config)
        self.config = config
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        # Conv1D keeps its weight as (in, out): every base-weight shape check and merge uses its layout
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.layer_index = layer_index
        self.merged_task: Optional[int] = None
        self.disabled = False
        # What the last forward under grad routed with, so that a checkpointed forward
        # re-run during backward (after the routing block may have closed, and on CUDA in
        # autograd's own thread, which sees no routing block) sees the same tasks.
        self._last_state = None
        # Batch counter of seeded Gumbel noise (config.seed): noise is a pure function of
        # (seed + layer_index, this counter, example), see routers.hashed_uniform.
        self.register_buffer("_noise_step", torch.zeros((), dtype=torch.long, device=base_layer.weight.device),
                             persistent=False)
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
        if config.router_selector == "private":  # mttl's PrivateSelector reads no logits: they do not train
            self.trainable_params = ("lora_A", "lora_B")

    @staticmethod
    def check_compatible(base_layer: nn.Module, config: RoutedLoraConfig, name: str = "base_layer") -> None:
        if not is_supported_base(base_layer):
            raise TypeError(f"{name}: expected {SUPPORTED_BASES}, got {type(base_layer).__name__}")
        h = config.n_heads
        n_in, n_out = base_features(base_layer)
        if n_in % h or n_out % h:
            raise ValueError(f"n_heads: {h} heads must divide in_features={n_in} and "
                             f"out_features={n_out} of {name!r}")

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

    def __setattr__(self, name, value):
        # Model code also writes them: Hugging Face's tie_weights() re-ties an lm_head to the
        # input embeddings by assigning `lm_head.weight`. The base layer takes it, provided the
        # adapter still fits it and no merged delta would be lost.
        if name in ("weight", "bias") and "base_layer" in self._modules:
            current = getattr(self.base_layer, name)
            if value is not current:
                if self.merged_task is not None:
                    raise ValueError(f"{name}: task {self.merged_task} is merged into this layer's base weight; "
                                     "call routedlora.unmerge before replacing it")
                shape = None if current is None else tuple(current.shape)
                got = None if value is None else tuple(value.shape)
                if shape != got:
                    raise ValueError(f"{name}: the routed layer's adapter is built for a base {name} of shape "
                                     f"{shape}, got {got} (re-inject after resizing a routed module)")
                setattr(self.base_layer, name, value)
            return
        super().__setattr__(name, value)

    @property
    def n_tasks(self) -> int:
        return self.router_logits.shape[0]

    @property
    def scale(self) -> float:
        return self.config.scale

    def _block_state(self):
        """The state of the :func:`routedlora.routing` block this thread / asyncio task routes this layer by."""
        state = context.current(self)
        if state is context.AMBIGUOUS:
            raise ValueError(context.AMBIGUOUS_MESSAGE)
        return state

    def _current_state(self):
        """The routing block's state; during a checkpointed re-run, the state the forward used."""
        state = self._block_state()
        if state is None and _recomputing():
            return self._last_state
        # eager only: a compiled graph recomputes from its own inputs, and a checkpointed region
        # under torch.compile may not write module attributes
        if (state is not None and self._last_state is not state and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            self._last_state = state
        return state

    def _batch(self, x: Tensor, task_ids) -> BatchRows:
        """This forward's routing rows: the routing block's (built once per batch), or from ``task_ids``."""
        lead = tuple(x.shape[:-1])
        if task_ids is None:
            state = self._current_state()
            if state is None:
                raise ValueError(_NO_TASKS)
            return state.rows_for(lead)
        ids = as_task_ids(task_ids, self.n_tasks, self.router_logits.device)
        if self.training and self.config.seed is not None and not _recomputing():
            self.advance_noise()  # a direct call is a batch of its own
        state = self._block_state()
        return batch_rows(ids, lead, state.expand if state is not None else 1,
                          unchecked=self.n_tasks if torch.compiler.is_compiling() else None)

    @torch.no_grad()
    def advance_noise(self) -> None:
        """Start the next batch of seeded Gumbel noise (:func:`routedlora.routing` advances every layer once
        per block)."""
        self._noise_step.add_(1)

    def _noise(self, B: int, row_example: Optional[Tensor], heads: int, skills: int, device) -> Optional[Tensor]:
        """Uniforms ``(rows, heads, skills)`` behind Gumbel-sigmoid noise, one draw per example.

        From torch's generator they are drawn in the logits' dtype, as PEFT's and mttl's
        ``RelaxedBernoulli`` draws them (``torch.rand(..., dtype=logits.dtype)``, clamped by the
        router at that dtype's ε), so bfloat16 logits draw PEFT's bfloat16 uniforms; seeded
        (``config.seed``) they are float32 hashes."""
        cfg = self.config
        if not (self.training and cfg.gumbel) or cfg.router_selector == "private" or cfg.router_l2_norm:
            return None
        rows = self._noise_rows()
        dtype = self.router_logits.dtype
        if cfg.seed is not None:
            u = hashed_uniform(cfg.seed + self.layer_index, self._noise_step, (B, heads, skills),
                               first_row=rows[0] if rows is not None else 0, device=device)
        elif rows is None:
            # the router clamps u to [ε, 1 − ε] (as gumbel_uniform does) inside its logit
            u = torch.rand((B, heads, skills), device=device, dtype=dtype)
        else:
            # Data parallel: draw the noise of the whole global batch (same generator
            # state on every rank) and keep this rank's rows, so that each example
            # gets the noise it would get in a single-process run.
            start, total = self._global_rows(rows, B)
            u = gumbel_uniform((total, heads, skills), device=device, dtype=dtype)[start:start + B]
        return u if row_example is None else u[row_example]

    @staticmethod
    def _global_rows(rows: Tuple[int, int], B: int) -> Tuple[int, int]:
        start, total = rows
        if start + B > total:
            raise ValueError(f"noise_rows: rows [{start}, {start + B}) of this batch exceed the global "
                             f"batch of {total}")
        return start, total

    # key of the seeded dropout stream, apart from the Gumbel noise's (below 2**63: the op takes an int64)
    _DROPOUT_STREAM = 0x5D1B54A3 << 32

    def _router_dropout_mask(self, B: int, row_example: Optional[Tensor], heads: int, skills: int,
                             device) -> Optional[Tensor]:
        """mttl's dropout on the routing probabilities (``router_dropout``): ``(rows, heads, skills)`` of 0 or
        ``1/(1-p)``, one draw per example, in training only; ``None`` otherwise.

        From torch's generator: ``torch.nn.functional.dropout`` of ones in the logits' dtype, the
        draws mttl's ``nn.Dropout`` makes on a tensor of that shape; seeded: a hashed stream of its own."""
        cfg = self.config
        p = cfg.router_dropout
        if not (self.training and p > 0):
            return None
        rows = self._noise_rows()
        if cfg.seed is not None:
            u = hashed_uniform((cfg.seed + self.layer_index) ^ self._DROPOUT_STREAM, self._noise_step,
                               (B, heads, skills), first_row=rows[0] if rows is not None else 0, device=device)
            mask = (u >= p).to(u.dtype) / (1 - p)
        else:
            start, total = (0, B) if rows is None else self._global_rows(rows, B)
            ones = torch.ones((total, heads, skills), device=device, dtype=self.router_logits.dtype)
            mask = torch.nn.functional.dropout(ones, p, training=True)[start:start + B]
        return mask if row_example is None else mask[row_example]

    def _plain_router(self) -> bool:
        """No mttl / PEFT-PR router option is on: the routing kernels compute this router exactly."""
        cfg = self.config
        return (cfg.router_selector == "learned" and not cfg.router_straight_through and not cfg.router_l2_norm
                and not cfg.router_dropout and not cfg.router_shared_skill and not cfg.router_average_correction
                and not cfg.cpoly_fixed_specific and not cfg.cpoly_tied_heads)

    def _kernel_route(self, rows_task: Tensor, row_example: Optional[Tensor],
                      by_task: Optional[TokenRows] = None) -> Optional[Routing]:
        """Routing in one Triton kernel (backends triton and cuda, routers poly/softmax/topk/mta), else None.

        Gumbel noise then comes from a seed (hashed from the layer's seed and batch counter, or
        drawn from torch's generator) and Philox keyed by (example, head, skill): the same
        distribution as the torch routers, not the same draws.
        """
        cfg = self.config
        if cfg.backend not in ("triton", "cuda") or cfg.router not in ("poly", "softmax", "topk", "mta"):
            return None
        if not self._plain_router():  # the kernels compute none of the router options: route in torch
            return None
        device = self.router_logits.device
        backend = resolve_backend(cfg.backend, device)
        seed, ex_offset = None, 0
        if cfg.router == "poly" and self.training and cfg.gumbel:
            if cfg.seed is None:
                seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
            else:
                bits = hashed_bits(cfg.seed + self.layer_index, self._noise_step, 2, device=device)
                seed = (bits[:1] << 30) ^ bits[1:]
            rows = self._noise_rows()
            ex_offset = rows[0] if rows is not None else 0
        kind = "topk" if cfg.router == "mta" else cfg.router
        grouping = by_task.grouping() if by_task is not None else None
        idx, w = backend.route(self.router_logits, rows_task, row_example, kind=kind, seed=seed, k=cfg.top_k,
                               temperature=cfg.temperature, renormalize=cfg.renormalize, ex_offset=ex_offset,
                               by_task=grouping)
        return Routing(idx, w)

    def _noise_rows(self) -> Optional[Tuple[int, int]]:
        return getattr(self._current_state(), "noise_rows", None)

    def noise_generator_state(self) -> Optional[Tensor]:
        """Batch counter of this layer's seeded Gumbel noise (``config.seed`` set); ``None`` otherwise.

        With ``seed=None`` the noise comes from torch's global generator: save that instead.
        """
        return None if self.config.seed is None else self._noise_step.detach().cpu().clone()

    def set_noise_generator_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`noise_generator_state` (exact resume of seeded noise)."""
        if self.config.seed is None:
            raise ValueError("state: this layer has no own noise generator (config.seed is None)")
        if not isinstance(state, Tensor) or state.dim() != 0 or state.dtype != torch.long:
            raise ValueError(f"state: expected the 0-d int64 batch counter that noise_generator_state() returns, "
                             f"got {state if not isinstance(state, Tensor) else (state.dtype, tuple(state.shape))}")
        with torch.no_grad():
            self._noise_step.copy_(state)

    def route(self, rows_task: Tensor, row_example: Optional[Tensor] = None, B: Optional[int] = None,
              unchecked: Optional[UncheckedRows] = None) -> Routing:
        """Sparse routing rows for the given task of each row (float32 weights).

        ``row_example`` maps each row to its example (``None``: row ``ρ`` is example ``ρ``);
        Gumbel noise (training) is drawn once per example, ``B`` of them.
        """
        if B is None:
            B = rows_task.shape[0] if row_example is None else int(row_example.max()) + 1
        idx, w = self._route(rows_task, row_example, B, unchecked=unchecked)
        return Routing(dense_index(*w.shape, device=w.device) if idx is None else idx, w)

    def _route(self, rows_task: Tensor, row_example: Optional[Tensor], B: int,
               by_task: Optional[TokenRows] = None, unchecked: Optional[UncheckedRows] = None
               ) -> Tuple[Optional[Tensor], Tensor]:
        """``(idx, w)`` of the rows; ``idx`` is ``None`` for the dense routers in torch (every skill in
        order), the kernel's own index rows when a kernel routes (the kernels read them anyway).

        ``unchecked``: the task ids' range was not checked; an out-of-range id (a negative one
        would wrap around in indexing) must not read another task's row (see :class:`UncheckedRows`;
        the routing kernels clamp and poison by themselves)."""
        routing = self._kernel_route(rows_task, row_example, by_task)
        if routing is not None:
            return tuple(routing)
        if unchecked is None:
            return self._torch_route(rows_task, row_example, B)
        idx, w = self._torch_route(unchecked.rows(), row_example, B)
        return idx, w + unchecked.poison()

    def _torch_route(self, rows_task: Tensor, row_example: Optional[Tensor], B: int):
        cfg = self.config
        _, h, m = self.router_logits.shape
        if cfg.router == "poly":
            if cfg.router_selector == "private":
                dtype = torch.float64 if self.router_logits.dtype == torch.float64 else torch.float32
                return tuple(private_route(rows_task, h, m, dtype=dtype))
            noise = self._noise(B, row_example, h, m, rows_task.device)
            if self._plain_router():
                return None, poly_weights(self.router_logits, noise, cfg.temperature, rows=rows_task)
            mask = self._router_dropout_mask(B, row_example, h, m, rows_task.device)
            return None, poly_option_weights(
                self.router_logits, rows_task, noise, cfg.temperature, straight_through=cfg.router_straight_through,
                l2_norm=cfg.router_l2_norm, dropout_mask=mask, shared_skill=cfg.router_shared_skill,
                average_correction=cfg.router_average_correction)
        logits = self.router_logits[rows_task]
        if logits.dtype != torch.float64:  # routers compute in float32, float64 logits in float64
            logits = logits.float()
        if cfg.router == "cpoly":
            noise = self._noise(B, row_example, h, cfg.n_skills, logits.device)
            specific = None
            if cfg.cpoly_fixed_specific:  # PEFT PR #1297's cpoly_simple: the one-hot pattern, a constant
                specific = cpoly_fixed_specific(rows_task, (m - cfg.n_skills) // cfg.n_specific, cfg.n_specific,
                                                dtype=logits.dtype)
            return None, cpoly_route(logits, n_common=cfg.n_skills, noise=noise, temperature=cfg.temperature,
                                     tied_heads=cfg.cpoly_tied_heads, specific=specific).w
        if cfg.router == "softmax":
            return None, torch.softmax(logits / cfg.temperature, dim=-1)
        return tuple(topk_route(logits, k=cfg.top_k, temperature=cfg.temperature, renormalize=cfg.renormalize))

    def _batch_route(self, batch: BatchRows) -> Tuple[Optional[Tensor], Tensor]:
        """``(idx, w)`` of the batch's rows. Where they are a fixed function of the logits (no noise,
        no gradient to the logits, not tracing) they are kept on the batch while the logits are
        unchanged (same storage, same version: any in-place update invalidates), so a generate
        loop's decode steps, which share one batch, launch no router after the first."""
        cfg = self.config
        logits = self.router_logits
        noisy = self.training and ((cfg.gumbel and cfg.router in ("poly", "cpoly")) or cfg.router_dropout > 0)
        fixed = not noisy and not (torch.is_grad_enabled() and logits.requires_grad) \
            and not torch.compiler.is_compiling()
        # a routing table shared by several layers (router_granularity) is routed once for all of them
        key = id(self) if cfg.router_granularity == "layer" else id(logits)
        if fixed:
            stamp = (logits._version, logits.data_ptr(), self.training, cfg.router, cfg.temperature, cfg.top_k,
                     cfg.renormalize, cfg.backend, cfg.router_selector, cfg.router_straight_through,
                     cfg.router_l2_norm, cfg.router_dropout, cfg.router_shared_skill, cfg.router_average_correction,
                     cfg.cpoly_fixed_specific, cfg.cpoly_tied_heads)
            hit = batch.routed.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        out = self._route(batch.rows_task, batch.row_example, batch.n_examples, batch.by_task(self.n_tasks),
                          unchecked=batch.unchecked)
        if fixed:
            batch.routed[key] = (stamp, out)
        return out

    # --- forward -----------------------------------------------------------------

    def _check_input(self, x) -> None:
        check_tensor("x", x, floating=True)
        w = self.base_layer.weight
        built = self._built_weight_shape()
        if tuple(w.shape) != built:
            raise ValueError(f"base_layer: weight has shape {tuple(w.shape)}, but the adapter was built for {built} "
                             "(was a routed module resized, e.g. resize_token_embeddings with a routed lm_head? "
                             "resize before routedlora.inject)")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"x: on {x.device}, but the layer is on {w.device}")
        # autocast legitimately feeds other dtypes to the base linear
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: dtype {x.dtype} differs from the layer's {w.dtype} (outside autocast)")

    def _built_weight_shape(self) -> Tuple[int, int]:
        """The base weight's shape the adapter fits, in the base's own layout."""
        h = self.lora_A.shape[0]
        n_in, n_out = h * self.lora_A.shape[2], h * self.lora_B.shape[3]
        return (n_in, n_out) if self.fan_in_fan_out else (n_out, n_in)

    def forward(self, x: Tensor, task_ids=None) -> Tensor:
        self._check_input(x)
        if self.merged_task is not None and task_ids is not None:
            ids = torch.as_tensor(task_ids)
            if values_checkable(ids) and bool((ids != self.merged_task).any()):
                raise ValueError(f"task_ids: task {self.merged_task} is merged into this layer; route only that "
                                 "task or call routedlora.unmerge first")
        if self.disabled or self.merged_task is not None:
            return self.base_layer(x)
        batch = self._batch(x, task_ids)
        lead = x.shape[:-1]
        if self._owns_base(x):
            # one op computes x Wᵀ + b + γΔ: the delta and, in backward, the adapter's dx are
            # accumulated into the base linear's buffers
            base = self.base_layer
            out = self._routed(x, batch, weight=base.weight, bias=base.bias)
            return out.view(*lead, self.out_features)
        result = self.base_layer(x)
        # The delta is accumulated into the base output when the op computes in its dtype
        # (under autocast the op computes in autocast's dtype, as the base linear did).
        fused = result.dtype == compute_dtype(x, self.lora_A.dtype)
        base = result.reshape(-1, self.out_features) if fused else None
        out = self._routed(x, batch, base=base)
        return out.view(result.shape) if fused else result + out.view(result.shape).to(result.dtype)

    def _owns_base(self, x: Tensor) -> bool:
        """Whether the op may compute the base linear itself: a plain ``nn.Linear`` without hooks,
        one dtype throughout (no autocast), and the same input for base and adapter (no dropout).
        A Conv1D base (weight ``(in, out)``) runs itself; the delta is accumulated into its output."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and x.dtype == base.weight.dtype == self.lora_A.dtype
                and not torch.is_autocast_enabled(x.device.type)
                and not (self.training and self.config.dropout > 0))

    def _lora_input(self, x: Tensor) -> Tensor:
        if self.config.dropout > 0:
            x = self.dropout(x)
        return x.reshape(-1, self.in_features).to(self.lora_A.dtype)

    def _routed(self, x: Tensor, batch: BatchRows, base: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
        """``base + γΔ`` (``x Wᵀ + b + γΔ`` with ``weight``; ``γΔ`` alone without either) for the flattened tokens."""
        # dense routers weight every skill in order: idx=None spares the op a scatter and a gather
        idx, w = self._batch_route(batch)
        # ids were checked once per batch and idx/w come from our own router: no per-call checks
        return routed_lora(self._lora_input(x), self.lora_A, self.lora_B, idx, w, batch.tokens,
                           scale=self.scale, combine=self.config.combine, base=base, weight=weight, bias=bias,
                           backend=self.config.backend, validate=False)

    # --- merging -----------------------------------------------------------------

    @torch.no_grad()
    def task_delta_weight(self, task_id: int) -> Tensor:
        """``γ (Â B̂)ᵀ`` of one task under evaluation routing, shape ``(out, in)`` (``nn.Linear``'s layout,
        whatever the base: a Conv1D base, ``fan_in_fan_out``, takes its transpose), float32."""
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < self.n_tasks:
            raise ValueError(f"task_id: expected an int in [0, {self.n_tasks}), got {task_id!r}")
        training = self.training
        self.eval()
        try:
            rows = torch.tensor([task_id], device=self.router_logits.device)
            routing = self.route(rows)
            eye = torch.eye(self.in_features, device=self.lora_A.device, dtype=torch.float32)
            delta = routed_lora(eye, self.lora_A.float(), self.lora_B.float(), routing.idx, routing.w,
                                seq_len=self.in_features, scale=self.scale, combine=self.config.combine,
                                backend="torch")
        finally:
            self.train(training)
        return delta.T

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_tasks={self.n_tasks}, "
                f"skills={self.lora_A.shape[1]}, r={c.r}, heads={c.n_heads}, router={c.router!r}, "
                f"combine={c.combine!r}, scale={self.scale:g}, backend={c.backend!r}")
