"""Which routing block each routed layer is in: per thread and per asyncio task.

:func:`routedlora.routing` publishes its :class:`~routedlora.batch.RoutingState` for the
model's layers in a ``contextvars.ContextVar``, so concurrent threads and asyncio tasks
never see each other's task ids, and nothing is left on the model when a block ends.

``torch.compile`` cannot read a ``ContextVar`` (dynamo does not trace ``ContextVar.get``),
so every block also publishes its state in a per-thread mirror that compiled code reads,
and a ``routing`` block traced inside a compiled function uses only the mirror. Two
asyncio tasks of one thread that route the same layers at once are told apart by the
``ContextVar`` in eager mode; the per-thread mirror cannot tell them apart, so it marks
those layers ambiguous and a compiled forward refuses them instead of guessing.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Iterator, Mapping, Optional, Sequence

import torch

_EMPTY: Mapping[int, object] = MappingProxyType({})
_ACTIVE: ContextVar[Mapping[int, object]] = ContextVar("routedlora_routing", default=_EMPTY)


class _Ambiguous:
    def __repr__(self) -> str:
        return "<routing state of several asyncio tasks>"


AMBIGUOUS = _Ambiguous()

AMBIGUOUS_MESSAGE = ("task ids: several asyncio tasks of this thread are inside routedlora.routing() blocks of "
                     "this model at once; a torch.compile'd model reads the routing state per thread and cannot "
                     "tell them apart (run the compiled model from one task at a time per thread, or eagerly)")


class _ThreadMirror(threading.local):
    def __init__(self):
        self.states: dict = {}  # id(layer) -> RoutingState or AMBIGUOUS, as compiled code reads it
        self.open: dict = {}  # id(layer) -> eager blocks open in this thread for that layer


_MIRROR = _ThreadMirror()


def current(layer) -> Optional[object]:
    """The routing state of the innermost block that routes ``layer`` in this context, else ``None``."""
    if torch.compiler.is_compiling():
        return _MIRROR.states.get(id(layer))
    return _ACTIVE.get().get(id(layer))


@contextmanager
def activate(layers: Sequence[torch.nn.Module], state) -> Iterator[None]:
    """Route ``layers`` by ``state`` in this thread / asyncio task until the block ends."""
    keys = [id(layer) for layer in layers]
    if torch.compiler.is_compiling():
        # traced: dynamo records the mirror's replacement and restoration symbolically, so the
        # compiled function leaves it as it found it
        before = _MIRROR.states
        new = dict(before)
        new.update(dict.fromkeys(keys, state))
        _MIRROR.states = new
        try:
            yield
        finally:
            _MIRROR.states = before
        return
    seen = _ACTIVE.get()
    token = _ACTIVE.set(MappingProxyType({**seen, **dict.fromkeys(keys, state)}))
    mirror = dict(_MIRROR.states)
    replaced = {}
    for key in keys:
        held = mirror.get(key)
        # the mirror holds a block this context cannot see: another asyncio task of this thread
        clash = held is not None and held is not seen.get(key)
        replaced[key] = held
        mirror[key] = AMBIGUOUS if clash or held is AMBIGUOUS else state
        _MIRROR.open[key] = _MIRROR.open.get(key, 0) + 1
    _MIRROR.states = mirror
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        mirror = dict(_MIRROR.states)
        for key in keys:
            left = _MIRROR.open[key] - 1
            if left:
                _MIRROR.open[key] = left
                if mirror.get(key) is not AMBIGUOUS:
                    mirror[key] = replaced[key]
            else:
                del _MIRROR.open[key]
                mirror.pop(key, None)
        _MIRROR.states = mirror
