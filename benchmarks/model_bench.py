"""Model level: a training step and generate() of a Llama-style decoder built from a config.

Routed LoRA goes on the projections a case names. Peers: single-LoRA PEFT, PEFT Poly,
each routedlora backend available, and (generate only) the bare model, all timed in the
same interleaved rounds (``speed_vs_<peer>`` is a median of same-round time ratios).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Tuple

import torch

import routedlora

from .peers import DTYPES, peft_available, routedlora_backends
from routedlora.timing import interleaved, peak_memory_mb, quartiles

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelCase:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    new_tokens: int
    tasks: int
    skills: int
    rank: int
    route_heads: int
    dtype: str
    targets: Tuple[str, ...] = ALL_PROJECTIONS

    def as_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = ",".join(self.targets)
        return d


def _model(case: ModelCase, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                      num_hidden_layers=case.layers, num_attention_heads=case.heads,
                      num_key_value_heads=case.kv_heads, max_position_embeddings=case.seq + case.new_tokens + 8)
    return LlamaForCausalLM(cfg).to(device=device, dtype=DTYPES[case.dtype])


def _randomize_adapters(model) -> None:
    # Init puts B at zero; time on random values instead (zeros can run faster).
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)


def _with_routedlora(backend: str) -> Callable:
    def build(case: ModelCase, device):
        model = _model(case, device)
        cfg = routedlora.RoutedLoraConfig(target_modules=list(case.targets), n_tasks=case.tasks, n_skills=case.skills,
                                          r=case.rank, n_heads=case.route_heads, backend=backend)
        routedlora.inject(model, cfg)

        def call(task_ids, fn):
            with routedlora.routing(model, task_ids):
                return fn(model)
        return model, call
    return build


def _with_peft_poly(case: ModelCase, device):
    from peft import PolyConfig, get_peft_model

    config = PolyConfig(r=case.rank, n_tasks=case.tasks, n_skills=case.skills, n_splits=case.route_heads,
                        target_modules=list(case.targets), task_type="CAUSAL_LM")
    model = get_peft_model(_model(case, device), config)

    def call(task_ids, fn):
        return fn(_TaskIds(model, task_ids))
    return model, call


def _with_peft_lora(case: ModelCase, device):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=case.rank, lora_alpha=1, target_modules=list(case.targets), task_type="CAUSAL_LM")
    model = get_peft_model(_model(case, device), config)
    return model, lambda task_ids, fn: fn(model)


def _bare(case: ModelCase, device):
    model = _model(case, device)
    return model, lambda task_ids, fn: fn(model)


class _TaskIds:
    """PEFT Poly takes task_ids as a keyword of forward/generate."""

    def __init__(self, model, task_ids):
        self.model, self.task_ids = model, task_ids

    def __call__(self, **kw):
        return self.model(task_ids=self.task_ids, **kw)

    def generate(self, **kw):
        return self.model.generate(task_ids=self.task_ids, **kw)


def model_peers(device: torch.device) -> Dict[str, Callable]:
    peers: Dict[str, Callable] = {"base": _bare}
    if peft_available():
        peers["peft_lora"] = _with_peft_lora
        peers["peft_poly"] = _with_peft_poly
    for name, backend in routedlora_backends(device).items():  # no interpreter at model size
        peers[name] = _with_routedlora(backend)
    return peers


def _train_step(model, call, ids, task_ids):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        loss = call(task_ids, lambda m: m(input_ids=ids, labels=ids).loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def _generate(model, call, prompt, task_ids, new_tokens):
    model.eval()

    def run():
        with torch.no_grad():
            call(task_ids, lambda m: m.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=0))
    return run


def run_case(case: ModelCase, device: torch.device, *, rounds: int, min_sample_s: float, max_seconds: float,
             progress=None) -> List[dict]:
    """A training step (every peer but the bare model) and ``generate()`` (every peer), each step kind
    timed in interleaved rounds; speeds are medians of same-round ratios."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(device)
    prompt = ids[:, : max(1, case.seq // 4)]
    task_ids = (torch.arange(case.batch) % case.tasks).to(device)
    built, errors = {}, {}
    for name, build in model_peers(device).items():
        try:
            model, call = build(case, device)
            if name != "base":
                _randomize_adapters(model)
            built[name] = (model, call)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    rows = []
    for step in ("train", "generate"):
        fns = {}
        for name, (model, call) in built.items():
            if step == "train" and name == "base":
                continue  # nothing to train
            fns[name] = (_train_step(model, call, ids, task_ids) if step == "train" else
                         _generate(model, call, prompt, task_ids, case.new_tokens))
        tokens = case.batch * (case.seq if step == "train" else case.new_tokens)
        try:
            res = interleaved(fns, device, rounds=rounds, min_sample_s=min_sample_s, max_seconds=max_seconds)
        except Exception as e:
            rows += [dict(level="model", peer=n, mode=step, **case.as_dict(), error=f"{type(e).__name__}: {e}")
                     for n in fns]
            continue
        for name in fns:
            row = dict(level="model", peer=name, mode=step, **case.as_dict(), **res.stats(name))
            row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
            if step == "generate":
                row["ms_per_new_token"] = row["median_ms"] / case.new_tokens
            for peer in ("peft_lora", "peft_poly", "base"):
                if peer in res.times and peer != name:
                    q = quartiles([b / a for a, b in zip(res.times[name], res.times[peer])])
                    row.update({f"speed_vs_{peer}": q[1], f"speed_vs_{peer}_q1": q[0], f"speed_vs_{peer}_q3": q[2]})
            row["peak_mem_mb"] = peak_memory_mb(fns[name], device)
            rows.append(row)
        if progress is not None:
            progress.update(1)
    for name, err in errors.items():
        rows.append(dict(level="model", peer=name, mode="-", **case.as_dict(), error=err))
    return rows
