"""The seed papers' recipes as one option of the trainer.

=============  ==================================================================================
recipe         what is trained
=============  ==================================================================================
``poly``       Polytropon multi-task pre-training: ``router="poly"``, one head
``mhr``        Multi-Head Routing: ``router="poly"`` with ``n_heads > 1`` (default 4)
``cpoly``      C-Poly: common skills (Gumbel-sigmoid) + task-private skills
``mta``        ALTER's MTA, two stages in one run: stage 1 (task skills, top-k Softmax-T), then
               ``mta_stage2_at`` adds shared skills and the gate and freezes the rest
``mta-stage2`` MTA stage 2 alone, from a stage-1 adapter (``init_adapter``)
``mhr-z``      few-shot adaptation from a trained adapter: new routing rows for the new tasks,
               only the routing logits train
``mhr-mu``     few-shot adaptation: the skills averaged into one LoRA per layer, which trains
``lora``       the baseline: one shared LoRA for all tasks (rank chosen for the same budget)
=============  ==================================================================================
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

from torch import nn

from ..checkpoint import load_adapter
from ..config import RoutedLoraConfig
from ..inject import inject, model_config
from ..recipes import mhr_mu, mhr_z, mta_stage2

RECIPES = ("poly", "mhr", "cpoly", "mta", "mta-stage2", "mhr-z", "mhr-mu", "lora")
PRETRAIN = ("poly", "mhr", "cpoly", "mta", "lora")
ADAPT = ("mta-stage2", "mhr-z", "mhr-mu")


def recipe_config(recipe: str, *, n_tasks: int, target_modules: Union[List[str], str], n_skills: int = 4,
                  r: int = 8, n_heads: Optional[int] = None, alpha: Optional[float] = None,
                  backend: str = "auto", seed: Optional[int] = None, **extra) -> RoutedLoraConfig:
    """The :class:`RoutedLoraConfig` of a pre-training recipe (``alpha`` defaults to ``r``, i.e. γ = 1)."""
    if recipe not in PRETRAIN:
        raise ValueError(f"recipe: expected one of {PRETRAIN} for a fresh adapter, got {recipe!r}"
                         + (" (adaptation recipes start from init_adapter)" if recipe in ADAPT else ""))
    kw = dict(target_modules=target_modules, r=r, alpha=float(r) if alpha is None else alpha, backend=backend,
              seed=seed, **extra)
    if recipe == "poly":
        if n_heads not in (None, 1):
            raise ValueError(f"n_heads: recipe 'poly' has one head, got {n_heads} (use recipe 'mhr')")
        return RoutedLoraConfig(n_tasks=n_tasks, n_skills=n_skills, n_heads=1, router="poly", **kw)
    if recipe == "mhr":
        h = 4 if n_heads is None else n_heads
        if h < 2:
            raise ValueError(f"n_heads: recipe 'mhr' needs n_heads >= 2, got {h}")
        return RoutedLoraConfig(n_tasks=n_tasks, n_skills=n_skills, n_heads=h, router="poly", **kw)
    if recipe == "cpoly":
        return RoutedLoraConfig(n_tasks=n_tasks, n_skills=n_skills, n_heads=n_heads or 1, router="cpoly", **kw)
    if recipe == "mta":
        return RoutedLoraConfig(n_tasks=n_tasks, n_skills=n_skills, n_heads=1, router="mta", **kw)
    # lora: one skill, one routing row, softmax over one skill = weight 1: plain LoRA
    return RoutedLoraConfig(n_tasks=1, n_skills=1, n_heads=1, router="softmax", **kw)


def adapter_parameters(model: nn.Module) -> int:
    """Number of adapter parameters (skills, logits, gates) of an injected model."""
    from ..inject import routed_layers

    return sum(p.numel() for _, layer in routed_layers(model) for p in layer.adapter_state().values())


def matched_lora_rank(model: nn.Module, config: RoutedLoraConfig) -> int:
    """Smallest rank of a single shared LoRA on the same modules with at least ``config``'s adapter parameters."""
    from ..inject import _matches

    layers = [m for n, m in model.named_modules() if n and isinstance(m, nn.Linear)
              and _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)]
    if not layers:
        raise ValueError(f"config.target_modules: no module matches {config.target_modules!r}")
    m, h, T = config.total_skills, config.n_heads, config.n_tasks
    routed = sum(m * config.r * (l.in_features + l.out_features) + T * h * m for l in layers)
    per_rank = sum(l.in_features + l.out_features for l in layers) + len(layers)  # + 1 logit per layer
    return max(1, math.ceil(routed / per_rank))


def apply_recipe(model: nn.Module, recipe: str, *, n_tasks: int, target_modules=None, n_skills: int = 4,
                 r: int = 8, n_heads: Optional[int] = None, alpha: Optional[float] = None, backend: str = "auto",
                 seed: Optional[int] = None, init_adapter: Optional[str] = None,
                 mta_stage2_at: Optional[int] = None) -> Dict:
    """Inject (or load) and prepare ``model`` for ``recipe``; returns :class:`TrainConfig` overrides.

    ``n_tasks``: the tasks to be trained (for ``mhr-z`` the *new* tasks, which get fresh
    routing rows after the pre-trained ones).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    if recipe in ADAPT:
        if init_adapter is None:
            raise ValueError(f"init_adapter: recipe {recipe!r} adapts a trained adapter; pass its path")
        if model_config(model) is None:
            load_adapter(model, init_adapter)
        if recipe == "mhr-z":
            new = mhr_z(model, n_new_tasks=n_tasks)
            return {"task_routing": "task", "task_offset": new[0]}
        if recipe == "mhr-mu":
            mhr_mu(model)
            return {"task_routing": "shared"}
        mta_stage2(model)
        return {"task_routing": "task"}
    if init_adapter is not None:
        raise ValueError(f"init_adapter: recipe {recipe!r} trains a fresh adapter; init_adapter is for {ADAPT}")
    if target_modules is None:
        raise ValueError("target_modules: required for a fresh adapter")
    config = recipe_config(recipe, n_tasks=n_tasks, target_modules=target_modules, n_skills=n_skills, r=r,
                           n_heads=n_heads, alpha=alpha, backend=backend, seed=seed)
    inject(model, config)
    out: Dict = {"task_routing": "shared" if recipe == "lora" else "task"}
    if recipe == "mta":
        out["mta_stage2_at"] = mta_stage2_at
    elif mta_stage2_at is not None:
        raise ValueError(f"mta_stage2_at: only for recipe 'mta', got recipe {recipe!r}")
    return out


__all__ = ["ADAPT", "PRETRAIN", "RECIPES", "adapter_parameters", "apply_recipe", "matched_lora_rank",
           "recipe_config"]
