"""Models for the trainer: tiny Llama / T5 built from a config (no downloads), or any HF checkpoint."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

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
    """Every ``nn.Linear`` but the output projection (PEFT's ``all-linear``), as name suffixes."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if n and isinstance(m, nn.Linear) and m is not out_emb and not n.endswith("lm_head")})
    if not names:
        raise ValueError("model: has no nn.Linear to target; pass target_modules")
    return names


__all__ = ["TINY", "build_model", "default_targets", "tiny_llama", "tiny_t5"]
