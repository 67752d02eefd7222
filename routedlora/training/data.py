"""Mixed-task data: synthetic text tasks generated in code, a char tokenizer, and collation.

An example is a dict ``{"prompt": [ids], "target": [ids]}``; a task's data is any
sequence of such dicts. :func:`collate` turns a list of examples into a padded batch
for a causal LM (prompt + target in one sequence, loss on the target only) or a
seq2seq LM (prompt to the encoder, target as ``labels``).

The synthetic tasks are string transformations of random letter strings. By default
the prompt starts with the task's name, so a single shared adapter *can* tell the tasks
apart (a fair baseline); ``task_prefix=False`` leaves only the routing to do it.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

ALPHABET = "abcdefghijklmnop"


def _shift(s: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in s)


def _swap_pairs(s: str) -> str:
    return "".join(s[i + 1] + s[i] if i + 1 < len(s) else s[i] for i in range(0, len(s), 2))


# name -> string transformation
TASKS: Dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "shift": _shift,
    "swap": _swap_pairs,
    "sort": lambda s: "".join(sorted(s)),
    "rotate": lambda s: s[1:] + s[:1],
}


class CharTokenizer:
    """Characters of the synthetic tasks plus ``<pad>`` (0), ``<eos>`` (1), ``:`` and ``=`` and task names' letters."""

    def __init__(self, chars: str = ALPHABET + "qrstuvwxyz:= "):
        self.pad_token_id, self.eos_token_id = 0, 1
        self.chars = "".join(dict.fromkeys(chars))
        self._index = {c: i + 2 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> List[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the tokenizer's alphabet") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


def synthetic_task(name: str, size: int, *, length: int = 6, seed: int = 0, task_prefix: bool = True,
                   tokenizer: Optional[CharTokenizer] = None) -> List[Dict[str, List[int]]]:
    """``size`` examples of one synthetic task: prompt ``"name:xxxxxx="``, target ``y + <eos>``."""
    if name not in TASKS:
        raise ValueError(f"name: unknown synthetic task {name!r}; choose from {sorted(TASKS)}")
    for arg, v in (("size", size), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    tok = tokenizer or CharTokenizer()
    rng = random.Random(f"{seed}/{name}")
    fn = TASKS[name]
    out = []
    for _ in range(size):
        s = "".join(rng.choice(ALPHABET) for _ in range(length))
        prompt = (f"{name}:" if task_prefix else "") + s + "="
        out.append({"prompt": tok.encode(prompt), "target": tok.encode(fn(s)) + [tok.eos_token_id]})
    return out


def synthetic_tasks(names: Sequence[str], sizes, *, length: int = 6, seed: int = 0, task_prefix: bool = True,
                    tokenizer: Optional[CharTokenizer] = None) -> Dict[str, List[Dict[str, List[int]]]]:
    """``{name: examples}`` for several tasks; ``sizes`` is one int or one per task."""
    if isinstance(sizes, int):
        sizes = [sizes] * len(names)
    if len(sizes) != len(names):
        raise ValueError(f"sizes: expected {len(names)} sizes (one per task), got {len(sizes)}")
    return {n: synthetic_task(n, s, length=length, seed=seed, task_prefix=task_prefix, tokenizer=tokenizer)
            for n, s in zip(names, sizes)}


def load_jsonl(path: str, tokenizer, *, add_eos: bool = True) -> Dict[str, List[Dict[str, List[int]]]]:
    """Read ``{"task": ..., "input": ..., "target": ...}`` lines, tokenised with a Hugging Face tokenizer.

    Blank lines are skipped; any other line that is not a JSON object with string ``task``
    (non-empty), ``input`` and ``target`` raises ``ValueError`` naming ``file:line``.
    A missing file raises ``FileNotFoundError``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"path: {path} is a directory, expected a JSONL file")
    tasks: Dict[str, List[Dict[str, List[int]]]] = {}
    # bytes, decoded line by line: a decoding error can then name its line
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"path: {path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")  # editors on Windows start files with a byte-order mark
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object with task, input and target, "
                                 f"got a JSON {_json_kind(rec)}")
            missing = {"task", "input", "target"} - set(rec)
            if missing:
                raise ValueError(f"{where} lacks fields {sorted(missing)}")
            for key in ("task", "input", "target"):
                if not isinstance(rec[key], str):
                    raise ValueError(f"{where}: {key} must be a string, got {_json_kind(rec[key])} "
                                     f"{json.dumps(rec[key])[:40]}")
            if not rec["task"]:
                raise ValueError(f"{where}: task is an empty string")
            prompt = tokenizer(rec["input"], add_special_tokens=False)["input_ids"]
            target = tokenizer(rec["target"], add_special_tokens=False)["input_ids"]
            if add_eos and tokenizer.eos_token_id is not None:
                target = target + [tokenizer.eos_token_id]
            if not target:
                raise ValueError(f"{where}: target has no tokens (nothing to learn from this line)")
            tasks.setdefault(rec["task"], []).append({"prompt": prompt, "target": target})
    if not tasks:
        raise ValueError(f"path: {path} holds no examples")
    return tasks


def _json_kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def collate(examples: Sequence[Mapping[str, Sequence[int]]], *, pad_id: int = 0,
            encoder_decoder: bool = False) -> Dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` off the target).

    Causal LMs get ``prompt + target`` with labels on the target positions (the model's
    logits at position ``i`` predict label ``i + 1``); encoder-decoders get the prompt as
    ``input_ids`` and the target as ``labels``.
    """
    if not examples:
        raise ValueError("examples: empty batch")
    if encoder_decoder:
        srcs = [list(e["prompt"]) for e in examples]
        tgts = [list(e["target"]) for e in examples]
        S, L = max(map(len, srcs)), max(map(len, tgts))
        ids = torch.full((len(srcs), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(srcs), S), dtype=torch.long)
        labels = torch.full((len(srcs), L), -100, dtype=torch.long)
        for i, (s, t) in enumerate(zip(srcs, tgts)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, :len(t)] = torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seqs = [list(e["prompt"]) + list(e["target"]) for e in examples]
    S = max(map(len, seqs))
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    labels = torch.full((len(seqs), S), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        p = len(e["prompt"])
        labels[i, p:len(s)] = torch.tensor(s[p:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["ALPHABET", "CharTokenizer", "TASKS", "collate", "load_jsonl", "synthetic_task", "synthetic_tasks"]
