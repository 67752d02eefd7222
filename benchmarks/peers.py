"""What a user would run instead of routedlora, built on the same inputs.

Layer-level peers take the same frozen base ``nn.Linear`` and the same skill and
routing values, and expose ``peer(x) -> y``. All but ``peft_lora`` (one plain LoRA,
a different function) compute the same routed layer, and the harness checks their
outputs against routedlora's reference before timing them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import routedlora
from routedlora import routers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerCase:
    tokens: int
    tasks: int  # distinct tasks in the batch (1 ... every sequence its own)
    heads: int
    skills: int
    rank: int
    d: int
    o: int
    dtype: str
    seq_len: int = 0  # tokens per sequence (one routing row each); 0: the profile's default

    def as_dict(self) -> dict:
        return asdict(self)

    def batch_shape(self, seq_len: int) -> Tuple[int, int]:
        """``(sequences, positions)``: sequences of ``seq_len`` tokens (the case's own if set), more if
        tasks need them."""
        seq_len = self.seq_len or seq_len
        seqs = max(self.tasks, math.ceil(self.tokens / seq_len))
        return seqs, max(1, self.tokens // seqs)


class LayerInputs:
    """Random (never zero) frozen base, skills, logits, tokens and task ids for one case."""

    def __init__(self, case: LayerCase, device: torch.device, seq_len: int, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dtype = DTYPES[case.dtype]
        h, m, r, d, o = case.heads, case.skills, case.rank, case.d, case.o
        self.case, self.device, self.dtype = case, device, dtype
        self.n_tasks = max(case.tasks, 1)
        self.seqs, self.pos = case.batch_shape(seq_len)
        base = nn.Linear(d, o, bias=True)
        with torch.no_grad():
            base.weight.copy_(torch.randn(o, d, generator=g) / math.sqrt(d))
            base.bias.copy_(torch.randn(o, generator=g) * 0.1)
        self.base = base.to(device=device, dtype=dtype).requires_grad_(False)
        self.A = (torch.randn(h, m, d // h, r, generator=g) / math.sqrt(d // h)).to(device, dtype)
        self.B = (torch.randn(h, m, r, o // h, generator=g) / math.sqrt(r)).to(device, dtype)
        self.logits = torch.randn(self.n_tasks, h, m, generator=g).to(device, dtype)
        perm = torch.randperm(self.seqs, generator=g)
        self.task_ids = (perm % self.n_tasks).to(device)  # every task present, order mixed
        self.x = torch.randn(self.seqs, self.pos, d, generator=g).to(device, dtype)
        self.scale = 1.0 / r  # PEFT Poly's


def _copy(dst: torch.Tensor, src: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(src.detach().clone().reshape(dst.shape).to(dst.dtype))


# --- peers ---------------------------------------------------------------------------


def base_peer(inp: LayerInputs) -> Callable:
    return inp.base


def routedlora_peer(backend: str) -> Callable[[LayerInputs], Callable]:
    def build(inp: LayerInputs):
        c = inp.case
        layer = routedlora.RoutedLoraLinear(inp.base, n_tasks=inp.n_tasks, n_skills=c.skills, r=c.rank,
                                            n_heads=c.heads, backend=backend)
        layer.lora_A, layer.lora_B = _copy(layer.lora_A, inp.A), _copy(layer.lora_B, inp.B)
        layer.router_logits = _copy(layer.router_logits, inp.logits)
        return lambda x: layer(x, task_ids=inp.task_ids)

    return build


def torch_algorithm(inp: LayerInputs, backward: bool) -> str:
    """The algorithm ``routedlora[torch]`` runs for this case (:func:`routedlora.ops.plan.choose`)."""
    from routedlora.ops import plan

    c = inp.case
    shape = plan.Shape(inp.seqs * inp.pos, inp.seqs, c.heads, c.skills, c.skills, c.d, c.o, c.rank,
                       DTYPES[c.dtype].itemsize, "params")
    return plan.cheaper(shape, inp.device.type, backward) if inp.pos > 0 else "rank_space"


def peft_poly_peer(inp: LayerInputs) -> Callable:
    from peft import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    c = inp.case
    layer = PolyLinear(inp.base, "default", PolyConfig(r=c.rank, n_tasks=inp.n_tasks, n_skills=c.skills,
                                                       n_splits=c.heads))
    layer.poly_lora_A["default"] = _copy(layer.poly_lora_A["default"], inp.A)
    layer.poly_lora_B["default"] = _copy(layer.poly_lora_B["default"], inp.B)
    router = layer.poly_router["default"]
    router.module_logits = _copy(router.module_logits, inp.logits)
    layer.to(inp.device)
    return lambda x: layer(x, task_ids=inp.task_ids)


def peft_lora_peer(inp: LayerInputs) -> Callable:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    c = inp.case
    layer = LoraLinear(inp.base, "default", LoraConfig(r=c.rank, lora_alpha=1), r=c.rank, lora_alpha=1)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)  # not zeros: zeros can time faster
    layer.to(inp.device)
    return layer


class _Mixed(nn.Module):
    """Skills and logits as trainable parameters, Poly routing, for the hand-written peers."""

    def __init__(self, inp: LayerInputs):
        super().__init__()
        self.inp = inp
        self.A, self.B = nn.Parameter(inp.A.clone()), nn.Parameter(inp.B.clone())
        self.logits = nn.Parameter(inp.logits.clone())

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        z = self.logits[rows].float()
        noise = routers.gumbel_uniform(z.shape, device=z.device) if self.training else None
        return routers.poly_route(z, noise=noise).w.to(self.A.dtype)  # (R, h, m)


class PerTaskLoop(_Mixed):
    """A Python loop over the tasks present: mix the task's adapter, apply it to its sequences."""

    def forward(self, x):
        inp = self.inp
        h, m, dh, r = self.A.shape
        y = inp.base(x)
        tasks = inp.task_ids.unique().tolist()  # host sync: the peer's nature
        w = self.weights(torch.tensor(tasks, device=x.device))
        for j, t in enumerate(tasks):
            sel = (inp.task_ids == t).nonzero().squeeze(1)
            A_t = torch.einsum("qm,qmdr->qdr", w[j], self.A).reshape(h * dh, r)
            B_t = torch.einsum("qm,qmro->rqo", w[j], self.B).reshape(r, -1)
            y = y.index_add(0, sel, (x[sel] @ A_t @ B_t) * inp.scale)
        return y


class DenseEinsum(_Mixed):
    """DESIGN.md §2's dense formulation in einsums under autograd: U = x[A_1..A_m], mix, V[B_1;..;B_m]."""

    def forward(self, x):
        inp = self.inp
        h, m, dh, r = self.A.shape
        W = self.weights(inp.task_ids)  # (B, h, m) per sequence
        xq = x.view(*x.shape[:2], h, dh)
        Z = torch.einsum("bsqd,qmdr->bsqmr", xq, self.A)
        u = torch.einsum("bqm,bsqmr->bsr", W, Z) * inp.scale
        delta = torch.einsum("bqm,bsr,qmro->bsqo", W, u, self.B)
        return inp.base(x) + delta.reshape(*x.shape[:2], -1)


class GroupedMM(_Mixed):
    """torch's grouped GEMM: one mixed adapter per task, tokens sorted by task, two grouped products."""

    def forward(self, x):
        inp = self.inp
        h, m, dh, r = self.A.shape
        T = inp.n_tasks
        w = self.weights(torch.arange(T, device=x.device))
        A_t = torch.einsum("tqm,qmdr->tqdr", w, self.A).reshape(T, h * dh, r)
        B_t = torch.einsum("tqm,qmro->trqo", w, self.B).reshape(T, r, -1)
        tok_task = inp.task_ids.repeat_interleave(x.shape[1])
        order = torch.argsort(tok_task, stable=True)
        offs = torch.bincount(tok_task, minlength=T).cumsum(0).to(torch.int32)
        xs = x.reshape(-1, x.shape[-1])[order]
        ys = torch._grouped_mm(torch._grouped_mm(xs, A_t, offs=offs), B_t, offs=offs) * inp.scale
        delta = torch.empty_like(ys).index_copy(0, order, ys)
        return inp.base(x) + delta.view(*x.shape[:2], -1)


def _module_peer(cls):
    def build(inp: LayerInputs):
        return cls(inp).to(inp.device)

    return build


# Triton's interpreter (the CPU path of the triton backend) runs element by element:
# the harness runs it on the small cases only, to show the path works, not to time it.
INTERPRETER_MAX_TOKENS = 64
INTERPRETER_MAX_WIDTH = 512


def routedlora_backends(device: torch.device, case=None) -> Dict[str, str]:
    """``{peer name: backend}`` of the routedlora backends to run on ``device`` for ``case``."""
    out = {}
    for backend in routedlora.available_backends(device):
        if backend == "triton" and device.type != "cuda":
            if case is None or case.tokens > INTERPRETER_MAX_TOKENS or max(case.d, case.o) > INTERPRETER_MAX_WIDTH:
                continue
            out["routedlora[triton-interpreter]"] = backend
        else:
            out[f"routedlora[{backend}]"] = backend
    return out


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def by_mode(rows: List[dict], key: str) -> Dict[str, Dict[str, float]]:
    """``{mode: {peer: row[key]}}`` over the rows that have ``key``: the same-run references of the ratios."""
    out: Dict[str, Dict[str, float]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault(r["mode"], {})[r["peer"]] = r[key]
    return out


def layer_peers(device: torch.device, case=None) -> Dict[str, Callable[[LayerInputs], Callable]]:
    """Peers available here for ``case``, floor first; routedlora's backends last."""
    peers: Dict[str, Callable] = {"base": base_peer}
    if peft_available():
        peers["peft_lora"] = peft_lora_peer
        peers["peft_poly"] = peft_poly_peer
    peers["per_task_loop"] = _module_peer(PerTaskLoop)
    peers["dense_einsum"] = _module_peer(DenseEinsum)
    if hasattr(torch, "_grouped_mm"):
        peers["grouped_mm"] = _module_peer(GroupedMM)
    for name, backend in routedlora_backends(device, case).items():
        peers[name] = routedlora_peer(backend)
    return peers


SAME_FUNCTION: List[str] = ["peft_poly", "per_task_loop", "dense_einsum", "grouped_mm", "routedlora[triton]",
                             "routedlora[triton-interpreter]", "routedlora[cuda]"]
REFERENCE = "routedlora[torch]"
