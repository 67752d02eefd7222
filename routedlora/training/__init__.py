"""Mixed-task training with routed LoRA: sampler, synthetic tasks, trainer, recipes, data parallel.

``python -m routedlora.training --help`` is the command line; see README.md, "Training".
"""
from .data import CharTokenizer, TASKS, collate, load_jsonl, synthetic_task, synthetic_tasks
from .distributed import init_distributed, rank_world, shard_fsdp2, wrap_ddp
from .recipes import RECIPES, adapter_parameters, apply_recipe, matched_lora_rank, recipe_config
from .sampler import MIXING, TaskSampler, mixing_probs
from .trainer import MultiTaskTrainer, TrainConfig, example_metrics

__all__ = [
    "CharTokenizer", "MIXING", "MultiTaskTrainer", "RECIPES", "TASKS", "TaskSampler", "TrainConfig",
    "adapter_parameters", "apply_recipe", "collate", "example_metrics", "init_distributed", "load_jsonl",
    "matched_lora_rank", "mixing_probs", "rank_world", "recipe_config", "shard_fsdp2", "synthetic_task",
    "synthetic_tasks", "wrap_ddp",
]
