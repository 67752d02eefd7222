"""ALTER's Mixture-of-Task-Adapters as a routed LoRA layer (DESIGN.md §1, "MTA layer").

Stage 1: task skills routed by top-k over per-task Softmax-T logits.
Stage 2: adds ``n_shared`` always-on shared skills mixed by a per-sequence gate
``α = softmax(MLP([Δ_task; Δ_shared_1; …]))`` read at the sequence's first
position. Both stages are one ``outputs``-combine call over all tokens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layer import RoutedLoraLinear
from .ops import routed_lora

# Stage 2 starts with the gate giving the task skills this share, so that adding
# the (zero-initialised) shared skills does not halve the stage-1 delta.
_INITIAL_TASK_SHARE = 0.9
# Stage-1 bias of task t's logit towards its own skill (t mod m); with Softmax-T at
# τ = 0.1 it makes that skill the top choice from the first step.
_OWN_SKILL_BIAS = 1.0


class MTALinear(RoutedLoraLinear):
    """Routed LoRA layer with ALTER's MTA routing. ``mta_stage`` is 1 or 2.

    Extra parameters: ``shared_A (1, n_shared, in, r)``, ``shared_B (1, n_shared, r, out)``
    and the gate network ``gate``. Task ids must be one per sequence in stage 2.
    During decoding (one-position inputs inside ``generate()`` under
    :func:`routedlora.routing`, or inside ``routing(..., decoding=True)``), the gate
    computed at the first position is reused from the cache.
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
        self.gate = nn.Sequential(
            nn.Linear((1 + n_sh) * self.out_features, cfg.gate_hidden, **kw),
            nn.Tanh(),
            nn.Linear(cfg.gate_hidden, 1 + n_sh, **kw),
        )
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
    def _reset_mta_parameters(self) -> None:
        cfg = self.config
        t = torch.arange(cfg.n_tasks, device=self.router_logits.device)
        self.router_logits[t, 0, t % cfg.n_skills] += _OWN_SKILL_BIAS
        bound = 1.0 / math.sqrt(self.in_features)
        self.shared_A.uniform_(-bound, bound)
        self.shared_B.zero_()
        last = self.gate[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = math.log(_INITIAL_TASK_SHARE * cfg.n_shared / (1 - _INITIAL_TASK_SHARE))

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
        alpha = torch.softmax(self.gate(feats).float(), dim=-1)
        if state is not None:
            state.cache[key] = alpha
        return alpha

    @torch.no_grad()
    def task_delta_weight(self, task_id: int) -> Tensor:
        if self.mta_stage != 1:
            raise ValueError("merge: an MTA layer in stage 2 gates on the input and cannot be merged")
        return super().task_delta_weight(task_id)
