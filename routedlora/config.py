"""RoutedLoraConfig: what `inject` builds and how each routed layer routes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import List, Optional, Union

from .backends import check_backend
from .validation import check_bool, check_int, check_module_names, check_number, check_positive, check_str

ROUTER_KINDS = ("poly", "softmax", "topk", "cpoly", "mta")
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
        gate_hidden: hidden width of the MTA gate network.
        exclude_modules: names (same matching as ``target_modules``) or a regex to skip.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        seed: seeds each layer's Gumbel-noise generator (layer ``i`` uses ``seed + i``);
            ``None`` draws from torch's global generator, like PEFT.
        init_weights: B at zero (the adapter starts as the identity); ``False``
            initialises B like A, for tests.
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
    exclude_modules: Optional[Union[List[str], str]] = None
    backend: str = "auto"
    seed: Optional[int] = None
    init_weights: bool = True

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
        if self.router in ("topk", "mta") and self.top_k > self.n_skills:
            raise ValueError(f"top_k: {self.top_k} exceeds n_skills={self.n_skills}")
        check_str("backend", self.backend)
        check_backend(self.backend)

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
