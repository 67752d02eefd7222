"""Input checks shared by every public entry point.

Shape, dtype and device checks read tensor metadata only. Value checks (an index
out of range) need the data: they run where it is free (CPU tensors) and are
skipped on accelerators and under ``torch.compile``, where the module-level
entry (:func:`routedlora.routing`) checks task ids once per batch instead.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import Tensor


def check_positive(name: str, value, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive int" if integer else "a positive number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, floating: bool = False,
                 integer: bool = False) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")


def check_same_device(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: on {t.device}, but {first_name} is on {first.device}")


def values_checkable(t: Tensor) -> bool:
    """True where reading values costs no host sync and no graph break."""
    if t.device.type != "cpu":
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


def check_index_range(name: str, t: Tensor, upper: int, what: str) -> None:
    """Raise if any entry of integer tensor ``t`` lies outside ``[0, upper)``."""
    if t.numel() == 0 or not values_checkable(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        raise ValueError(f"{name}: {what} must be >= 0, got {lo}")
    if hi >= upper:
        raise ValueError(f"{name}: {what} out of range: got {hi}, but there are only {upper}")


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    """A finite real number (``bool`` is not one): ``inf`` and ``nan`` would poison every output silently."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def check_bool(name: str, value) -> None:
    # a truthy string ("false") or 0/1 would be accepted by `if value:` and mean something else
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def check_int(name: str, value, *, optional: bool = False, minimum: Optional[int] = None) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        what = "None or an int" if optional else "an int"
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_str(name: str, value, *, nonempty: bool = True) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
    if nonempty and not value:
        raise ValueError(f"{name}: expected a non-empty str")


def check_module_names(name: str, spec, *, allow_empty: bool = False) -> None:
    """A list of module names (non-empty strings) or one regex string that compiles."""
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"{name}: expected a non-empty regex string or a list of names, got ''")
        try:
            re.compile(spec)
        except re.error as e:
            raise ValueError(f"{name}: {spec!r} is not a valid regular expression: {e}") from None
        return
    if not isinstance(spec, list):
        raise ValueError(f"{name}: expected a list of module names or a regex string, got {type(spec).__name__}")
    if not spec and not allow_empty:
        raise ValueError(f"{name}: expected a non-empty list of module names or a regex string, got []")
    for entry in spec:
        if not isinstance(entry, str):
            raise TypeError(f"{name}: entries must be module names (str), got {type(entry).__name__} {entry!r}")
        if not entry:
            raise ValueError(f"{name}: entries must be non-empty module names, got ''")
