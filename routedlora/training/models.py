"""Models for the trainer: tiny Llama / T5 built from a config (no downloads), or any HF checkpoint."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..layer import is_supported_base

TINY = ("tiny-llama", "tiny-t5")


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def tiny_t5(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers,
                   num_decoder_layers=layers, num_heads=4, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg)


def build_model(name: str, *, vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """``tiny-llama`` / ``tiny-t5`` (random init, frozen base) or a Hugging Face name or path."""
    if name == "tiny-llama":
        return tiny_llama(vocab_size, hidden, layers, seed)
    if name == "tiny-t5":
        return tiny_t5(vocab_size, hidden, layers, seed)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(name)
    cls = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    return cls.from_pretrained(name)


def default_targets(model: nn.Module) -> List[str]:
    """Every ``nn.Linear`` (or GPT-2-style ``Conv1D``) but the output projection (PEFT's
    ``all-linear``), as name suffixes."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if n and is_supported_base(m) and m is not out_emb and not n.endswith("lm_head")})
    if not names:
        raise ValueError("model: has no nn.Linear or Conv1D to target; pass target_modules")
    return names


# Submodules holding a transformer block's feed-forward network: Llama/Mistral/Qwen/GPT-2 `mlp`,
# T5 `DenseReluDense`, Falcon/others `feed_forward` / `ffn`.
FFN_MODULES = ("mlp", "DenseReluDense", "feed_forward", "ffn")
# A module name inside a stack of blocks: `<stack>.<block index>.<rest>` (the first numeric component).
_IN_BLOCK = re.compile(r"^(?P<stack>.*?)\.(?P<block>\d+)\.(?P<rest>.+)$")


def ffn_targets(model: nn.Module, last_blocks: int = 1,
                within: Optional[Union[Sequence[str], str]] = None) -> List[str]:
    """Full names of the ``nn.Linear`` (or ``Conv1D``) modules in the feed-forward network of the last ``last_blocks``
    blocks of every stack of blocks (ALTER's placement: its experts replace the FFN of the last
    block of T5's encoder and of its decoder).

    A stack is a list of blocks numbered ``0, 1, …`` (``model.layers``, ``encoder.block``,
    ``decoder.block``, ``transformer.h``); an FFN is a submodule named as in :data:`FFN_MODULES`
    (Llama ``mlp.gate_proj/up_proj/down_proj``, T5 ``DenseReluDense.wi/wi_0/wi_1/wo``).
    ``within``: keep only the names that also match these (``target_modules`` matching).
    """
    from ..inject import _matches

    if isinstance(last_blocks, bool) or not isinstance(last_blocks, int) or last_blocks < 1:
        raise ValueError(f"last_blocks: expected a positive int, got {last_blocks!r}")
    found = {}  # stack -> {block index: [names]}
    for name, module in model.named_modules():
        m = _IN_BLOCK.match(name) if is_supported_base(module) else None
        if m is None or not any(part in FFN_MODULES for part in m["rest"].split(".")[:-1]):
            continue
        if within is not None and not _matches(name, within):
            continue
        found.setdefault(m["stack"], {}).setdefault(int(m["block"]), []).append(name)
    names = [n for blocks in found.values() for b in sorted(blocks)[-last_blocks:] for n in blocks[b]]
    if not names:
        raise ValueError("model: found no feed-forward nn.Linear inside numbered blocks"
                         + (f" matching {within!r}" if within is not None else "")
                         + f" (FFN submodules are named one of {FFN_MODULES}); pass target_modules to recipe 'mta'")
    return names


__all__ = ["FFN_MODULES", "TINY", "build_model", "default_targets", "ffn_targets", "tiny_llama", "tiny_t5"]
