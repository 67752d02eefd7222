"""Triton kernels of routedlora, installed as ``routedlora.triton_kernels``.

``routed_lora`` holds the kernels of the routed LoRA op; the launchers and the
custom-op registration live in :mod:`routedlora.ops.triton_backend`.
"""
