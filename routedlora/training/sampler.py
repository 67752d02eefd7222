"""Task-aware sampling of mixed-task batches: uniform, proportional and temperature-scaled mixing.

The probability of task ``t`` with ``n_t`` training examples (capped at ``cap`` when given,
T5's "examples-proportional mixing with an artificial limit") is

* ``uniform``: ``1 / T``
* ``proportional``: ``n_t / Σ n``
* ``temperature``: ``n_t^{1/τ} / Σ n^{1/τ}`` (mT5 / T5's temperature-scaled mixing;
  τ = 1 is proportional, τ → ∞ uniform).

Every example of a batch draws its own task, so a batch mixes tasks freely. Within a
task, examples are visited in a fresh random order each epoch (without replacement).
All randomness comes from the sampler's own generator, whose state is checkpointed:
a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

MIXING = ("uniform", "proportional", "temperature")


def mixing_probs(sizes: Sequence[int], mixing: str = "proportional", temperature: float = 1.0,
                 cap: Optional[int] = None) -> torch.Tensor:
    """Task probabilities (float64, sums to one) for ``sizes`` examples per task."""
    if mixing not in MIXING:
        raise ValueError(f"mixing: expected one of {MIXING}, got {mixing!r}")
    if isinstance(sizes, (str, bytes)) or not len(sizes):
        raise ValueError(f"sizes: expected a non-empty sequence of example counts, got {sizes!r}")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"sizes: every task needs a positive int number of examples, got {list(sizes)!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ValueError(f"cap: expected a positive int or None, got {cap!r}")
    n = torch.tensor([min(s, cap) if cap else s for s in sizes], dtype=torch.float64)
    if mixing == "uniform":
        p = torch.ones_like(n)
    elif mixing == "proportional":
        p = n
    else:
        p = n.pow(1.0 / temperature)
    return p / p.sum()


class TaskSampler:
    """Draws ``(task_ids, example_ids)`` for mixed-task batches.

    Args:
        sizes: number of examples of each task.
        mixing: ``"uniform" | "proportional" | "temperature"``.
        temperature: τ of temperature-scaled mixing.
        cap: optional per-task cap on the sizes used for the mixing weights.
        seed: seed of the sampler's own generator (torch's global generator is untouched).
    """

    def __init__(self, sizes: Sequence[int], mixing: str = "proportional", temperature: float = 1.0,
                 cap: Optional[int] = None, seed: int = 0):
        self.probs = mixing_probs(sizes, mixing, temperature, cap)
        self.sizes = [int(s) for s in sizes]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.generator = torch.Generator().manual_seed(seed)
        self._order: List[Optional[torch.Tensor]] = [None] * len(self.sizes)
        self._cursor = [0] * len(self.sizes)
        self.epochs = [0] * len(self.sizes)

    @property
    def n_tasks(self) -> int:
        return len(self.sizes)

    def _take(self, task: int, count: int) -> torch.Tensor:
        out = []
        while count:
            if self._order[task] is None or self._cursor[task] >= self.sizes[task]:
                if self._order[task] is not None:
                    self.epochs[task] += 1
                self._order[task] = torch.randperm(self.sizes[task], generator=self.generator)
                self._cursor[task] = 0
            n = min(count, self.sizes[task] - self._cursor[task])
            out.append(self._order[task][self._cursor[task]:self._cursor[task] + n])
            self._cursor[task] += n
            count -= n
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` tasks drawn i.i.d. from the mixing weights, and an example of each."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        tasks = torch.multinomial(self.probs, batch_size, replacement=True, generator=self.generator)
        examples = torch.empty(batch_size, dtype=torch.long)
        for t in range(self.n_tasks):  # data preparation on the host, not the model's hot path
            where = (tasks == t).nonzero().flatten()
            if where.numel():
                examples[where] = self._take(t, where.numel())
        return tasks, examples

    def state_dict(self) -> Dict:
        return {"generator": self.generator.get_state(), "order": list(self._order),
                "cursor": list(self._cursor), "epochs": list(self.epochs), "sizes": list(self.sizes),
                "probs": self.probs.clone()}

    def check_state_dict(self, state, *, allow_new_mixing: bool = False) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would reject ``state``; changes nothing.

        ``allow_new_mixing`` accepts a state saved under other mixing weights (the order of
        examples within each task carries over; new tasks are drawn with this sampler's weights).
        """
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a sampler state dict, got {type(state).__name__}")
        missing = sorted({"generator", "order", "cursor", "epochs", "sizes", "probs"} - set(state))
        if missing:
            raise ValueError(f"state: sampler state lacks {missing}")
        sizes = state["sizes"]
        if not isinstance(sizes, (list, tuple)) or list(sizes) != self.sizes:
            raise ValueError(f"state: sampler was saved for task sizes {sizes}, this one has {self.sizes}")
        probs = state["probs"]
        if not allow_new_mixing and not (isinstance(probs, torch.Tensor) and probs.dtype == self.probs.dtype
                                         and probs.shape == self.probs.shape and torch.equal(probs, self.probs)):
            raise ValueError("state: sampler was saved with different mixing weights")
        gen = state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError("state: sampler generator state is not a uint8 tensor")
        try:  # a scratch generator tells whether the bytes are a valid state
            torch.Generator().set_state(gen)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"state: sampler generator state is invalid ({str(e).splitlines()[0]})") from None
        T = self.n_tasks
        for key in ("order", "cursor", "epochs"):
            if not isinstance(state[key], (list, tuple)) or len(state[key]) != T:
                raise ValueError(f"state: sampler {key} must hold one entry per task ({T})")
        for t, (order, cursor, epochs) in enumerate(zip(state["order"], state["cursor"], state["epochs"])):
            n = self.sizes[t]
            if order is not None and not (isinstance(order, torch.Tensor) and order.dtype == torch.long
                                          and tuple(order.shape) == (n,)
                                          and torch.equal(order.sort().values, torch.arange(n))):
                raise ValueError(f"state: sampler order of task {t} is not a permutation of its {n} examples")
            if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= n:
                raise ValueError(f"state: sampler cursor of task {t} is {cursor!r}, expected an int in [0, {n}]")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
                raise ValueError(f"state: sampler epoch count of task {t} is {epochs!r}, expected an int >= 0")

    def load_state_dict(self, state: Dict, *, allow_new_mixing: bool = False) -> None:
        self.check_state_dict(state, allow_new_mixing=allow_new_mixing)
        self.generator.set_state(state["generator"])
        self._order = list(state["order"])
        self._cursor = list(state["cursor"])
        self.epochs = list(state["epochs"])

__all__ = ["MIXING", "TaskSampler", "mixing_probs"]
