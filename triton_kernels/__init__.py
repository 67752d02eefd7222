"""Triton kernels of routedlora, installed as ``routedlora.triton_kernels``.

Empty in this release: the ``triton`` backend is not implemented yet and
``routedlora.backends.resolve_backend("triton")`` says so. The kernels will
implement the contract of :mod:`routedlora.ops.torch_backend`.
"""
