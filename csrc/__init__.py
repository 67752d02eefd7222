"""CUDA C++ sources of the ``cuda`` backend, shipped as package data.

Nothing here is Python: :mod:`routedlora.cuda_build` finds this folder through this
package, builds it with ninja on first use and compile-checks it in CI.
"""
