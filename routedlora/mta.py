"""ALTER's Mixture-of-Task-Adapters as a routed LoRA layer (DESIGN.md §1, "MTA layer").

ALTER's own code (alibaba/EasyNLP ``examples/mta``, ``models/models/modeling_MTA.py``) is the
default wherever it decides something; each option names what it follows:

* task logits (``mta_init``): ``alter`` — every logit 0.2, 0.22 on the adjacent skills
  ``t mod m`` and ``(t + 1) mod m`` of task ``t`` (``MTA_noisegate`` / ``MTA_sharemoe4``);
  ``own_skill`` — +1.0 on skill ``t mod m``, which Softmax-T at τ = 0.1 saturates.
* stage 1 (``mta_routing``): ``dense`` — Softmax-T over every task skill
  (``MTA_noisegate``); ``topk`` — the ``top_k`` largest (the paper's top-k selection).
* stage 2 (``mta_stage2``): ``fixed_pair`` — skills ``t`` and ``t + 1`` (mod m) with their
  Softmax-T weights, not renormalised (``MTA_sharemoe4``); ``topk`` — the ``top_k`` largest.
* stage-2 gate (``mta_gate``): ``alter`` — ``Linear(no bias) → ReLU → Linear(no bias)``, hidden
  ``d_model``, random init (``MTA_sharemoe4``); ``tanh`` — biases, ``gate_hidden`` wide,
  starting at a 0.9 task share.

Stage 2 adds ``n_shared`` always-on shared skills mixed by a per-sequence gate
``α = softmax(MLP([Δ_task; Δ_shared_1; …]))`` read at the sequence's first position. Both
stages are one ``outputs``-combine call over all tokens. Unlike ALTER, whose experts are
copies of the pretrained FFN of chosen blocks, the skills here are LoRA deltas on whichever
modules are targeted (the training recipe ``mta-alter`` targets the FFN of the last blocks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .backends import resolve_backend
from .layer import RoutedLoraLinear
from .ops import routed_lora
from .ops.rows import TokenRows
from .routers import Routing, topk_route

# gate="tanh": stage 2 starts with the gate giving the task skills this share, so that adding
# the (zero-initialised) shared skills does not halve the stage-1 delta.
_INITIAL_TASK_SHARE = 0.9
# init="own_skill": bias of task t's logit towards its own skill (t mod m); with Softmax-T at
# τ = 0.1 it makes that skill the top choice from the first step (preference e^10).
_OWN_SKILL_BIAS = 1.0
# init="alter": ALTER's task-to-adapter logits, 0.2 everywhere and 0.22 on two adjacent skills
# (EasyNLP examples/mta/models/models/modeling_MTA.py, MTA_noisegate and MTA_sharemoe4).
_ALTER_LOGIT, _ALTER_PREFERRED = 0.2, 0.22


def _wide(t: Tensor) -> Tensor:
    """Routing arithmetic in float32, or float64 when the parameters are float64."""
    return t if t.dtype == torch.float64 else t.float()


class MTALinear(RoutedLoraLinear):
    """Routed LoRA layer with ALTER's MTA routing. ``mta_stage`` is 1 or 2.

    Extra parameters: ``shared_A (1, n_shared, in, r)``, ``shared_B (1, n_shared, r, out)``
    and the gate network ``gate`` (the MLP before the softmax: ``gate[0]`` and ``gate[2]``
    are its linears). Task ids must be one per sequence in stage 2.
    During decoding (one-position inputs inside ``generate()`` under
    :func:`routedlora.routing`, or inside ``routing(..., decoding=True)``), the gate
    computed at the first position is reused from the cache.

    Routing of the task skills by stage (``config.mta_routing``, ``config.mta_stage2``):
    stage 1 ``dense`` (every skill, Softmax-T) or ``topk``; stage 2 ``fixed_pair`` (skills
    ``t``, ``t + 1`` mod m, Softmax-T weights as they are) or ``topk``.
    """

    def __init__(self, base_layer: nn.Linear, config=None, **kwargs):
        super().__init__(base_layer, config, **kwargs)
        cfg = self.config
        if cfg.router != "mta":
            raise ValueError(f"config.router: MTALinear needs router='mta', got {cfg.router!r}")
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        n_sh = cfg.n_shared
        self.shared_A = nn.Parameter(torch.empty(1, n_sh, self.in_features, cfg.r, **kw))
        self.shared_B = nn.Parameter(torch.empty(1, n_sh, cfg.r, self.out_features, **kw))
        feats = (1 + n_sh) * self.out_features
        if cfg.mta_gate == "alter":
            # ALTER's gate (MTA_sharemoe4): hidden d_model, no biases, nn.Linear's random init
            hidden = min(self.in_features, self.out_features)
            self.gate = nn.Sequential(nn.Linear(feats, hidden, bias=False, **kw), nn.ReLU(),
                                      nn.Linear(hidden, 1 + n_sh, bias=False, **kw))
        else:
            self.gate = nn.Sequential(nn.Linear(feats, cfg.gate_hidden, **kw), nn.Tanh(),
                                      nn.Linear(cfg.gate_hidden, 1 + n_sh, **kw))
        self.mta_stage = 1
        self._reset_mta_parameters()

    def set_stage(self, stage: int) -> None:
        """Stage 1 trains task skills and task logits; stage 2 only shared skills and the gate."""
        if stage not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
        self.mta_stage = stage
        self.trainable_params = ("lora_A", "lora_B", "router_logits") if stage == 1 else (
            "shared_A", "shared_B", "gate")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "shared_A" in self._parameters:  # the base __init__ calls this before the MTA parameters exist
            for module in self.gate:
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            self._reset_mta_parameters()

    @torch.no_grad()
    def _reset_mta_parameters(self) -> None:
        cfg = self.config
        t = torch.arange(cfg.n_tasks, device=self.router_logits.device)
        m = cfg.n_skills
        if cfg.mta_init == "alter":
            self.router_logits.fill_(_ALTER_LOGIT)
            self.router_logits[t, 0, t % m] = _ALTER_PREFERRED
            self.router_logits[t, 0, (t + 1) % m] = _ALTER_PREFERRED
        else:
            self.router_logits[t, 0, t % m] += _OWN_SKILL_BIAS
        bound = 1.0 / math.sqrt(self.in_features)
        self.shared_A.uniform_(-bound, bound)
        self.shared_B.zero_()
        if cfg.mta_gate == "tanh":
            last = self.gate[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[0] = math.log(_INITIAL_TASK_SHARE * cfg.n_shared / (1 - _INITIAL_TASK_SHARE))

    # --- routing of the task skills ------------------------------------------------

    def task_routing_mode(self) -> str:
        """How the task skills are routed now: ``"dense"``, ``"topk"`` or ``"fixed_pair"``."""
        cfg = self.config
        return cfg.mta_routing if self.mta_stage == 1 else cfg.mta_stage2

    def _kernel_route(self, rows_task: Tensor, row_example: Optional[Tensor],
                      by_task: Optional[TokenRows] = None) -> Optional[Routing]:
        mode = self.task_routing_mode()
        if mode == "topk":
            return super()._kernel_route(rows_task, row_example, by_task)
        cfg = self.config
        if mode == "fixed_pair" or cfg.backend not in ("triton", "cuda"):
            return None  # a gather of two weights per row: torch
        # dense: the kernels' softmax router (every skill, in order)
        backend = resolve_backend(cfg.backend, self.router_logits.device)
        grouping = by_task.grouping() if by_task is not None else None
        idx, w = backend.route(self.router_logits, rows_task, row_example, kind="softmax", seed=None,
                               k=cfg.n_skills, temperature=cfg.temperature, renormalize=False, ex_offset=0,
                               by_task=grouping)
        return Routing(idx, w)

    def _torch_route(self, rows_task: Tensor, row_example: Optional[Tensor], B: int):
        cfg = self.config
        z = _wide(self.router_logits[rows_task])
        mode = self.task_routing_mode()
        if mode == "dense":
            return None, torch.softmax(z / cfg.temperature, dim=-1)
        if mode == "topk":
            return tuple(topk_route(z, k=cfg.top_k, temperature=cfg.temperature, renormalize=cfg.renormalize))
        # fixed_pair: skills t and t + 1 (mod m) with their Softmax-T weights, not renormalised
        m = z.shape[-1]
        t = rows_task.long()
        idx = torch.stack([t % m, (t + 1) % m], dim=-1).unsqueeze(1)  # (R, 1, 2)
        return idx, torch.softmax(z / cfg.temperature, dim=-1).gather(-1, idx)

    # --- forward -------------------------------------------------------------------

    def _routed(self, x, batch, base=None, weight=None, bias=None) -> Tensor:
        routing = self.route(batch.rows_task, batch.row_example, batch.n_examples, unchecked=batch.unchecked)
        x2 = self._lora_input(x)
        cfg = self.config
        if self.mta_stage == 1:
            return routed_lora(x2, self.lora_A, self.lora_B, routing.idx, routing.w, batch.tokens,
                               scale=self.scale, combine="outputs", base=base, weight=weight, bias=bias,
                               backend=cfg.backend, validate=False)
        if batch.row_example is not None:
            raise ValueError("task_ids: MTA stage 2 gates per sequence; pass one task id per sequence")
        B = batch.n_examples
        alpha = self._gate_weights(x, x2, routing, B)
        m, n_sh = self.lora_A.shape[1], cfg.n_shared
        shared_idx = torch.arange(m, m + n_sh, device=routing.idx.device).expand(B, 1, n_sh)
        idx = torch.cat([routing.idx, shared_idx], dim=-1)
        w = torch.cat([alpha[:, :1, None] * routing.w, alpha[:, None, 1:]], dim=-1)
        # The parameters are concatenated (a copy of the skills, not per example) so
        # that task and shared skills run as one call with per-row weights.
        A = torch.cat([self.lora_A, self.shared_A], dim=1)
        Bm = torch.cat([self.lora_B, self.shared_B], dim=1)
        return routed_lora(x2, A, Bm, idx, w, batch.tokens, scale=self.scale, combine="outputs", base=base,
                           weight=weight, bias=bias, backend=cfg.backend, validate=False)

    def _gate_weights(self, x: Tensor, x2: Tensor, routing, B: int) -> Tensor:
        state = self._block_state()
        decoding = state is not None and state.decoding and x.dim() >= 3 and x.shape[1] == 1
        key = id(self)
        if B == 0:
            return torch.zeros(0, 1 + self.config.n_shared, device=x2.device)
        if decoding and state is not None and key in state.cache and state.cache[key].shape[0] == B:
            return state.cache[key]
        x0 = x2.view(B, -1, self.in_features)[:, 0]  # the [START] position of each sequence
        task_out = routed_lora(x0, self.lora_A, self.lora_B, routing.idx, routing.w, seq_len=1,
                               scale=self.scale, combine="outputs", backend=self.config.backend, validate=False)
        shared_out = torch.einsum("bd,sdr,sro->bso", x0, self.shared_A[0], self.shared_B[0]) * self.scale
        feats = torch.cat([task_out, shared_out.flatten(1)], dim=-1).to(self.gate[0].weight.dtype)
        alpha = torch.softmax(_wide(self.gate(feats)), dim=-1)
        if state is not None:
            state.cache[key] = alpha
        return alpha

    @torch.no_grad()
    def task_delta_weight(self, task_id: int) -> Tensor:
        if self.mta_stage != 1:
            raise ValueError("merge: an MTA layer in stage 2 gates on the input and cannot be merged")
        return super().task_delta_weight(task_id)
