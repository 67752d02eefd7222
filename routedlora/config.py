"""RoutedLoraConfig: what `inject` builds and how each routed layer routes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import List, Optional, Union

from .backends import check_backend
from .validation import check_bool, check_int, check_module_names, check_number, check_positive, check_str

ROUTER_KINDS = ("poly", "softmax", "topk", "cpoly", "mta")
# MTA options and their allowed values, the default first (see RoutedLoraConfig's docstring)
MTA_OPTIONS = {"mta_init": ("alter", "own_skill"), "mta_routing": ("dense", "topk"),
               "mta_stage2": ("fixed_pair", "topk"), "mta_gate": ("alter", "tanh")}
_DEFAULT_COMBINE = {"poly": "params", "softmax": "params", "cpoly": "params", "topk": "outputs", "mta": "outputs"}


@dataclass
class RoutedLoraConfig:
    """Configuration of routed LoRA layers.

    Args:
        target_modules: module names to replace (a list: a module matches when its
            full name equals an entry or ends with ``"." + entry``) or one regex
            string matched against the full name with ``re.fullmatch``.
        n_tasks: rows of each layer's ``router_logits`` (tasks, or any routing table).
        n_skills: skills ``m`` per layer. For ``cpoly`` the number of common skills;
            the layer then holds ``n_skills + n_tasks * n_specific`` skills.
            For ``mta`` the number of task skills (shared skills come on top).
        r: LoRA rank.
        n_heads: heads ``h`` of multi-head routing (MHR); must divide in and out features.
        router: ``"poly" | "softmax" | "topk" | "cpoly" | "mta"``.
        combine: ``"params" | "outputs"``; default ``params`` for poly/softmax/cpoly,
            ``outputs`` for topk/mta (which need ``n_heads == 1``).
        alpha: scale numerator, ``γ = alpha / r``; the default 1.0 is PEFT Poly's ``1/r``.
        dropout: dropout on the LoRA branch's input (PEFT Poly has none).
        temperature: τ of Gumbel-sigmoid (poly, cpoly) or softmax (softmax, topk, mta).
            Default: 1.0, but 0.1 for ``mta`` (ALTER's Softmax-T).
        gumbel: draw Gumbel-sigmoid noise in training (PEFT's behaviour); ``False`` is
            mttl's plain-sigmoid training.
        top_k: skills kept per row by ``topk`` / ``mta`` (default 2).
        renormalize: renormalise the kept top-k weights to sum to one.
        n_specific: task-private skills per task (``cpoly``).
        n_shared: always-on shared skills (``mta``, stage 2).
        gate_hidden: hidden width of the MTA gate network (``mta_gate="tanh"`` only; ALTER's
            gate is as wide as the model, see ``mta_gate``).
        mta_init: ``"alter" | "own_skill"``, the MTA task logits' initialisation. ``alter``
            (default, ALTER's code): every logit 0.2, and 0.22 on the two adjacent skills
            ``t mod m`` and ``(t + 1) mod m`` of task ``t`` — a mild preference (at τ = 0.1 and
            m = 4 the weights are 0.27, 0.27, 0.23, 0.23). ``own_skill``: ``U(±1e-3)`` plus 1.0 on
            skill ``t mod m``, which Softmax-T at τ = 0.1 saturates (routedlora's earlier default).
        mta_routing: ``"dense" | "topk"``, MTA stage-1 routing of the task skills: ``dense``
            (default, ALTER's code) weights every task skill by Softmax-T; ``topk`` keeps the
            ``top_k`` largest (the paper's top-k selection; sparse compute), renormalised when
            ``renormalize``.
        mta_stage2: ``"fixed_pair" | "topk"``, MTA stage-2 selection of the task skills:
            ``fixed_pair`` (default, ALTER's code) takes skills ``t mod m`` and ``(t + 1) mod m``
            of task ``t`` with their Softmax-T weights, not renormalised; ``topk`` keeps the
            ``top_k`` largest Softmax-T weights (renormalised when ``renormalize``).
        mta_gate: ``"alter" | "tanh"``, the MTA stage-2 gate network before its softmax.
            ``alter`` (default, ALTER's code): ``Linear(no bias) → ReLU → Linear(no bias)``,
            hidden width ``min(in_features, out_features)`` (ALTER's ``d_model`` on a
            transformer's projections), ``nn.Linear``'s random init. ``tanh``: ``Linear → Tanh →
            Linear`` with biases, hidden ``gate_hidden``, output layer zero-initialised with a
            0.9 share for the task skills (stage 2 starts from the stage-1 function).
        exclude_modules: names (same matching as ``target_modules``) or a regex to skip.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        seed: seeds each layer's Gumbel-noise generator (layer ``i`` uses ``seed + i``);
            ``None`` draws from torch's global generator, like PEFT.
        init_weights: B at zero (the adapter starts as the identity); ``False``
            initialises B like A, for tests.
        router_granularity: ``"layer" | "block" | "model"`` (default ``"layer"``): which routed
            layers share one ``router_logits`` table (mttl's ``router_granularity``). ``block``:
            the layers of one transformer block, the block named by the module name up to and
            including its first all-digit component (``model.layers.3.self_attn.q_proj`` →
            ``model.layers.3``; a name without one, e.g. ``lm_head``, is a block of its own);
            ``model``: every routed layer. A shared table is one ``nn.Parameter`` used by each
            layer of its group (gradients add up), saved once under its first layer's name.
            Layers sharing a table must have the same heads, skills, tasks, device and dtype.
            Not for ``mta``.
        router_selector: ``"learned" | "private"`` (default ``"learned"``), ``poly`` only.
            ``private`` is mttl's ``PrivateSelector``: task ``t`` uses skill ``t`` alone with
            weight 1 in every head (needs ``n_skills >= n_tasks``, ``gumbel=False`` and no other
            router option; ``router_logits`` is kept but neither used nor trained).
        router_straight_through: ``poly`` only. mttl's ``module_logits_straight_through``:
            ``σ(z)`` rounded to {0, 1} in the forward (training and evaluation), the gradient of
            ``σ(z)`` in the backward. With ``gumbel=True`` the rounded value is the training
            Gumbel-sigmoid sample (a straight-through Bernoulli sample; mttl refuses that pair).
        router_l2_norm: ``poly`` only. mttl's ``module_logits_l2_norm``: the weights are the
            logits L2-normalised over the skills of each head, nothing else (needs
            ``gumbel=False`` and no other router option).
        router_dropout: ``poly`` only, in ``[0, 1)``. mttl's ``module_logits_dropout``: dropout
            on ``σ(z)`` (after the straight-through rounding, before the normalisation), drawn per
            example in training only (mttl's inline ``nn.Dropout`` also drops in evaluation).
        router_shared_skill: ``poly`` only. mttl's ``poly_use_shared_skill``: the last skill's
            ``σ(z)`` is replaced by 1 before the normalisation (always on, in every head).
        router_average_correction: ``poly`` only. mttl's ``poly_average_correction``: no
            normalisation; the weights are ``σ(z) · √h / √m``.
        cpoly_fixed_specific: ``cpoly`` only. PEFT PR #1297's ``cpoly_simple``: the task-specific
            weights are the fixed one-hot ownership pattern, not read from ``router_logits``
            and not trained (the common skills' logits train as usual).
        cpoly_tied_heads: ``cpoly`` only. PEFT PR #1297's ``cpoly``: one task-specific weight per
            task-private skill, shared by every head (head 0's entries of ``router_logits``
            serve all heads; the other heads' task-specific entries are unused).
    """

    target_modules: Union[List[str], str]
    n_tasks: int
    n_skills: int = 4
    r: int = 8
    n_heads: int = 1
    router: str = "poly"
    combine: Optional[str] = None
    alpha: float = 1.0
    dropout: float = 0.0
    temperature: Optional[float] = None
    gumbel: bool = True
    top_k: int = 2
    renormalize: bool = True
    n_specific: int = 1
    n_shared: int = 1
    gate_hidden: int = 32
    mta_init: str = "alter"
    mta_routing: str = "dense"
    mta_stage2: str = "fixed_pair"
    mta_gate: str = "alter"
    exclude_modules: Optional[Union[List[str], str]] = None
    backend: str = "auto"
    seed: Optional[int] = None
    init_weights: bool = True
    router_granularity: str = "layer"
    router_selector: str = "learned"
    router_straight_through: bool = False
    router_l2_norm: bool = False
    router_dropout: float = 0.0
    router_shared_skill: bool = False
    router_average_correction: bool = False
    cpoly_fixed_specific: bool = False
    cpoly_tied_heads: bool = False

    def __post_init__(self):
        # Every field is checked here, at construction: a wrong type that slipped through
        # (seed="abc", gumbel="no", alpha=nan) would otherwise fail far away, or not fail
        # at all and silently compute something else.
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, (tuple, set, frozenset)):
                check_module_names(field, list(value), allow_empty=field == "exclude_modules")
                setattr(self, field, sorted(value))  # sorted: a set has no order, and JSON has no sets
        check_module_names("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            check_module_names("exclude_modules", self.exclude_modules, allow_empty=True)
        for name in ("n_tasks", "n_skills", "r", "n_heads", "top_k", "gate_hidden", "n_specific", "n_shared"):
            check_positive(name, getattr(self, name), integer=True)
        check_str("router", self.router)
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router: expected one of {ROUTER_KINDS}, got {self.router!r}")
        if self.combine is None:
            self.combine = _DEFAULT_COMBINE[self.router]
        if self.combine not in ("params", "outputs"):
            raise ValueError(f"combine: expected 'params' or 'outputs', got {self.combine!r}")
        if self.router == "mta" and self.combine != "outputs":
            raise ValueError("combine: router='mta' mixes skill outputs; use combine='outputs'")
        if self.combine == "outputs" and self.n_heads != 1:
            raise ValueError(f"n_heads: combine='outputs' takes one head, got {self.n_heads}")
        if self.temperature is None:
            self.temperature = 0.1 if self.router == "mta" else 1.0
        check_number("temperature", self.temperature, positive=True)
        check_number("alpha", self.alpha, positive=True)
        check_number("dropout", self.dropout, nonnegative=True)
        if not self.dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        for name in ("gumbel", "renormalize", "init_weights"):
            check_bool(name, getattr(self, name))
        check_int("seed", self.seed, optional=True)
        uses_top_k = self.router == "topk" or (self.router == "mta" and "topk" in (self.mta_routing, self.mta_stage2))
        if uses_top_k and self.top_k > self.n_skills:
            raise ValueError(f"top_k: {self.top_k} exceeds n_skills={self.n_skills}")
        # Router options (mttl's, PEFT PR #1297's); the defaults are PEFT Poly's behaviour.
        ROUTER_GRANULARITIES, ROUTER_SELECTORS = ("layer", "block", "model"), ("learned", "private")
        check_str("router_granularity", self.router_granularity)
        if self.router_granularity not in ROUTER_GRANULARITIES:
            raise ValueError(f"router_granularity: expected one of {ROUTER_GRANULARITIES}, "
                             f"got {self.router_granularity!r}")
        if self.router_granularity != "layer" and self.router == "mta":
            raise ValueError("router_granularity: MTA layers initialise their own task logits; use 'layer'")
        check_str("router_selector", self.router_selector)
        if self.router_selector not in ROUTER_SELECTORS:
            raise ValueError(f"router_selector: expected one of {ROUTER_SELECTORS}, got {self.router_selector!r}")
        flags = ("router_straight_through", "router_l2_norm", "router_shared_skill", "router_average_correction",
                 "cpoly_fixed_specific", "cpoly_tied_heads")
        for name in flags:
            check_bool(name, getattr(self, name))
        check_number("router_dropout", self.router_dropout, nonnegative=True)
        if not self.router_dropout < 1.0:
            raise ValueError(f"router_dropout: expected a number in [0, 1), got {self.router_dropout!r}")
        chosen = [n for n in flags[:4] if getattr(self, n)] + (["router_dropout"] if self.router_dropout else [])
        if self.router_selector != "learned":
            chosen.insert(0, "router_selector")
        if chosen and self.router != "poly":
            raise ValueError(f"{chosen[0]}: an option of router='poly' (Poly/MHR), got router={self.router!r}")
        for name in ("cpoly_fixed_specific", "cpoly_tied_heads"):
            if getattr(self, name) and self.router != "cpoly":
                raise ValueError(f"{name}: an option of router='cpoly', got router={self.router!r}")
        for name in ("router_selector", "router_l2_norm"):
            if name in chosen:  # these replace the sigmoid: mttl ignores every other option there
                if len(chosen) > 1:
                    raise ValueError(f"{name}: {'private routing' if name == 'router_selector' else 'L2-normalised logits'}"
                                     f" takes no other router option, got {[n for n in chosen if n != name]}")
                if self.gumbel:
                    raise ValueError(f"gumbel: {name}={getattr(self, name)!r} draws no Gumbel noise; pass gumbel=False")
        if self.router_selector == "private" and self.n_skills < self.n_tasks:
            raise ValueError(f"router_selector: 'private' gives each task its own skill: n_skills={self.n_skills} "
                             f"< n_tasks={self.n_tasks}")
        check_str("backend", self.backend)
        check_backend(self.backend)
        # MTA options (ALTER's code by default); checked whatever the router, as a typo is a typo
        for name, allowed in MTA_OPTIONS.items():
            check_str(name, getattr(self, name))
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.router == "mta" and self.mta_stage2 == "fixed_pair" and self.n_skills < 2:
            raise ValueError(f"mta_stage2: 'fixed_pair' takes two task skills, got n_skills={self.n_skills}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def total_skills(self) -> int:
        """Skills a layer's ``lora_A``/``lora_B`` hold (``m``), MTA's shared ones excluded."""
        if self.router == "cpoly":
            return self.n_skills + self.n_tasks * self.n_specific
        return self.n_skills

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RoutedLoraConfig":
        """The config :meth:`to_dict` wrote; errors name the field."""
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict of fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        missing = sorted(n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ValueError(f"config: missing required fields {missing}")
        return cls(**d)

    def replace(self, **changes) -> "RoutedLoraConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["RoutedLoraConfig", "ROUTER_KINDS"]
