"""Autograd ops of routedlora. See :func:`routed_lora` for shapes."""
from . import plan, rank_space, row_mixed, torch_backend
from .routed_lora import COMBINES, RoutedLoraFunction, check_routed_lora_inputs, routed_lora
from .rows import TokenRows

__all__ = ["COMBINES", "RoutedLoraFunction", "TokenRows", "check_routed_lora_inputs", "plan", "rank_space",
           "routed_lora", "row_mixed", "torch_backend"]
