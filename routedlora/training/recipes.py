"""The seed papers' recipes as one option of the trainer.

=============  ==================================================================================
recipe         what is trained
=============  ==================================================================================
``poly``       Polytropon multi-task pre-training: ``router="poly"``, one head
``mhr``        Multi-Head Routing: ``router="poly"`` with ``n_heads > 1`` (default 4)
``cpoly``      C-Poly: common skills (Gumbel-sigmoid) + task-private skills
``mta``        ALTER's MTA, two stages in one run: stage 1 (task skills, Softmax-T: dense by default,
               ``mta_routing="topk"`` for sparse compute), then ``mta_stage2_at`` adds shared skills
               and the gate and freezes the rest; on ``target_modules``
``mta-alter``  ``mta`` placed as ALTER placed its experts: on the feed-forward network (Llama
               ``mlp.gate_proj/up_proj/down_proj``, T5 ``DenseReluDense.wi/wo``) of the last
               ``mta_blocks`` blocks (default 1, ALTER's choice) of every stack of blocks (T5: the
               encoder's and the decoder's); ``target_modules``, if given, narrows the choice
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
from ..layer import base_features, is_supported_base
from ..config import RoutedLoraConfig
from ..inject import inject, model_config
from ..recipes import mhr_mu, mhr_z, mta_stage2
from .models import ffn_targets

RECIPES = ("poly", "mhr", "cpoly", "mta", "mta-alter", "mta-stage2", "mhr-z", "mhr-mu", "lora")
PRETRAIN = ("poly", "mhr", "cpoly", "mta", "mta-alter", "lora")
ADAPT = ("mta-stage2", "mhr-z", "mhr-mu")
MTA_RECIPES = ("mta", "mta-alter")


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
    if recipe in MTA_RECIPES:
        return RoutedLoraConfig(n_tasks=n_tasks, n_skills=n_skills, n_heads=1, router="mta", **kw)
    bad = sorted(k for k in extra if k.startswith("mta_"))
    if bad:
        raise ValueError(f"{bad[0]}: an MTA option, for recipes {MTA_RECIPES}; got recipe {recipe!r}")
    # lora: one skill, one routing row, softmax over one skill = weight 1: plain LoRA
    return RoutedLoraConfig(n_tasks=1, n_skills=1, n_heads=1, router="softmax", **kw)


def adapter_parameters(model: nn.Module) -> int:
    """Number of adapter parameters (skills, logits, gates) of an injected model."""
    from ..inject import routed_layers

    return sum(p.numel() for _, layer in routed_layers(model) for p in layer.adapter_state().values())


def matched_lora_rank(model: nn.Module, config: RoutedLoraConfig) -> int:
    """Smallest rank of a single shared LoRA on the same modules with at least ``config``'s adapter parameters."""
    from ..inject import _matches

    sizes = [sum(base_features(m)) for n, m in model.named_modules() if n and is_supported_base(m)
             and _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)]
    if not sizes:
        raise ValueError(f"config.target_modules: no module matches {config.target_modules!r}")
    m, h, T = config.total_skills, config.n_heads, config.n_tasks
    routed = sum(m * config.r * size + T * h * m for size in sizes)
    per_rank = sum(sizes) + len(sizes)  # + 1 logit per layer
    return max(1, math.ceil(routed / per_rank))


def apply_recipe(model: nn.Module, recipe: str, *, n_tasks: int, target_modules=None, n_skills: int = 4,
                 r: int = 8, n_heads: Optional[int] = None, alpha: Optional[float] = None, backend: str = "auto",
                 seed: Optional[int] = None, init_adapter: Optional[str] = None,
                 mta_stage2_at: Optional[int] = None, mta_blocks: Optional[int] = None,
                 mta_options: Optional[Dict[str, str]] = None) -> Dict:
    """Inject (or load) and prepare ``model`` for ``recipe``; returns :class:`TrainConfig` overrides.

    ``n_tasks``: the tasks to be trained (for ``mhr-z`` the *new* tasks, which get fresh
    routing rows after the pre-trained ones). ``mta_blocks``: recipe ``mta-alter``, how many
    of the last blocks get experts (default 1). ``mta_options``: recipes ``mta`` / ``mta-alter``,
    :class:`RoutedLoraConfig` MTA fields (``mta_init``, ``mta_routing``, ``mta_stage2``,
    ``mta_gate``) to set; the others keep their defaults (ALTER's code).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    mta_options = dict(mta_options or {})
    unknown = sorted(k for k in mta_options if k not in ("mta_init", "mta_routing", "mta_stage2", "mta_gate"))
    if unknown:
        raise ValueError(f"mta_options: unknown options {unknown} (mta_init, mta_routing, mta_stage2, mta_gate)")
    if mta_options and recipe not in MTA_RECIPES:
        raise ValueError(f"mta_options: only for recipes {MTA_RECIPES} (a stage-2 run takes the saved adapter's), "
                         f"got recipe {recipe!r}")
    if mta_blocks is not None and recipe != "mta-alter":
        raise ValueError(f"mta_blocks: only for recipe 'mta-alter', got recipe {recipe!r}")
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
    if recipe not in MTA_RECIPES and mta_stage2_at is not None:
        raise ValueError(f"mta_stage2_at: only for recipes {MTA_RECIPES}, got recipe {recipe!r}")
    if recipe == "mta-alter":
        target_modules = ffn_targets(model, 1 if mta_blocks is None else mta_blocks, within=target_modules)
    if target_modules is None:
        raise ValueError("target_modules: required for a fresh adapter")
    config = recipe_config(recipe, n_tasks=n_tasks, target_modules=target_modules, n_skills=n_skills, r=r,
                           n_heads=n_heads, alpha=alpha, backend=backend, seed=seed, **mta_options)
    inject(model, config)
    out: Dict = {"task_routing": "shared" if recipe == "lora" else "task"}
    if recipe in MTA_RECIPES:
        out["mta_stage2_at"] = mta_stage2_at
    return out


__all__ = ["ADAPT", "MTA_RECIPES", "PRETRAIN", "RECIPES", "adapter_parameters", "apply_recipe", "matched_lora_rank",
           "recipe_config"]
