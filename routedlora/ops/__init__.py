"""Autograd ops of routedlora. See :func:`routed_lora` for shapes."""
from .routed_lora import COMBINES, RoutedLoraFunction, check_routed_lora_inputs, routed_lora

__all__ = ["COMBINES", "RoutedLoraFunction", "check_routed_lora_inputs", "routed_lora"]
