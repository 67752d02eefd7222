"""routedlora on real Hugging Face models (tiny, built from configs; no downloads).

Covers inject (Llama, T5, BERT), routing (per sequence, scalar, per token),
generate() with KV cache and beam search, the MTA layer's two stages, adapter
save/load, merge/unmerge and the error paths of inject/routing.
Everything runs in float32 on the CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import routedlora

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
ADAPTER_PARAMS = ("lora_A", "lora_B", "router_logits")
MTA_STAGE2_PARAMS = ("shared_A", "shared_B", "gate")


# ---------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------

def make_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = None  # never stop early: fixed-length generations
    return model


def make_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg).float().eval()
    model.generation_config.eos_token_id = None
    return model


def make_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg).float().eval()


def _names(prefixes, leaves):
    return {f"{p}.{leaf}" for p in prefixes for leaf in leaves}


_LLAMA_ATTN = [f"model.layers.{i}.self_attn" for i in range(2)]
_T5_SELF = ([f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
            + [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(2)])
_T5_CROSS = [f"decoder.block.{i}.layer.1.EncDecAttention" for i in range(2)]
_BERT_ATTN = [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]

# kind -> (builder, target list, expected from list, target regex, expected from regex)
SPECS = {
    "llama": (make_llama, ["q_proj", "v_proj"], _names(_LLAMA_ATTN, ["q_proj", "v_proj"]),
              r"model\.layers\.1\.self_attn\.(q|v)_proj", _names(_LLAMA_ATTN[1:], ["q_proj", "v_proj"])),
    "t5": (make_t5, ["q", "v"], _names(_T5_SELF + _T5_CROSS, ["q", "v"]),
           r".*\.SelfAttention\.(q|v)", _names(_T5_SELF, ["q", "v"])),
    "bert": (make_bert, ["query", "value"], _names(_BERT_ATTN, ["query", "value"]),
             r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)", _names(_BERT_ATTN, ["query", "value"])),
}
KINDS = list(SPECS)


def make_inputs(kind: str, B: int = 3, S: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        dec = torch.randint(2, VOCAB, (B, S), generator=g)
        dec[:, 0] = 0  # decoder_start_token_id
        inputs["decoder_input_ids"] = dec
    return inputs


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's output as one (B, ...) tensor."""
    if isinstance(model, BertForSequenceClassification):
        out = model(**inputs, output_hidden_states=True)
        return torch.cat([out.logits.flatten(1), out.hidden_states[-1].flatten(1)], dim=1)
    return model(**inputs).logits


def routed_run(model, inputs, task_ids) -> torch.Tensor:
    with routedlora.routing(model, task_ids):
        return run(model, inputs)


@torch.no_grad()
def spread_logits(model: nn.Module, seed: int = 123, std: float = 2.0) -> None:
    """Give every task a clearly different mixture (the default init is almost uniform)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in routedlora.routed_layers(model):
        layer.router_logits.copy_(torch.randn(layer.router_logits.shape, generator=g) * std)


def routed_names(model):
    return {n for n, _ in routedlora.routed_layers(model)}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def injected(kind: str, n_tasks: int = 3, init_weights: bool = False, seed: int = 0, **kw):
    builder, targets = SPECS[kind][0], SPECS[kind][1]
    model = builder(seed)
    cfg = routedlora.RoutedLoraConfig(target_modules=targets, n_tasks=n_tasks, n_skills=3, r=4,
                                      init_weights=init_weights, seed=0, **kw)
    routedlora.inject(model, cfg)
    model.eval()  # the new layers are created in training mode (see test_inject_keeps_eval_mode)
    if not init_weights:
        spread_logits(model)
    return model


def assert_differs(a, b, tol=1e-4):
    assert (a - b).abs().max().item() > tol


# ---------------------------------------------------------------------------------------
# 1. inject on Llama, T5 and BERT
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("by", ["list", "regex"])
def test_inject_targets_and_freezes(kind, by):
    builder, names, expected_list, regex, expected_regex = SPECS[kind]
    model = builder()
    targets, expected = (names, expected_list) if by == "list" else (regex, expected_regex)
    before = {n: type(m) for n, m in model.named_modules()}
    cfg = routedlora.RoutedLoraConfig(target_modules=targets, n_tasks=3, n_skills=3, r=4, n_heads=2)
    assert routedlora.inject(model, cfg) is model
    assert routed_names(model) == expected
    for name, module in model.named_modules():
        if name in expected:
            assert type(module) is routedlora.RoutedLoraLinear, name
            assert type(module.base_layer) is nn.Linear
            assert module.lora_A.shape == (2, 3, module.in_features // 2, 4)
            assert module.lora_B.shape == (2, 3, 4, module.out_features // 2)
            assert module.router_logits.shape == (3, 2, 3)
        elif name in before and ".base_layer" not in name:
            assert type(module) is before[name], name  # nothing else was replaced
    # only adapter parameters train, every base parameter is frozen
    assert trainable(model) == _names(expected, ADAPTER_PARAMS)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMS:
            assert not p.requires_grad, name
    assert routedlora.model_config(model) is cfg


def test_regex_is_fullmatched_on_the_full_name():
    # "q_proj" as a regex must match the whole module name, not a suffix of it
    with pytest.raises(ValueError, match="target_modules"):
        routedlora.inject(make_llama(), routedlora.RoutedLoraConfig(target_modules="q_proj", n_tasks=2))
    model = make_llama()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=r".*\.q_proj", n_tasks=2))
    assert routed_names(model) == _names(_LLAMA_ATTN, ["q_proj"])


def test_exclude_modules():
    model = make_llama()
    cfg = routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"],
                                      n_tasks=2)
    routedlora.inject(model, cfg)
    assert routed_names(model) == _names(_LLAMA_ATTN, ["q_proj", "v_proj"]) - {"model.layers.0.self_attn.v_proj"}


def test_inject_keeps_eval_mode():
    model = make_llama()
    assert not model.training
    cfg = routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, init_weights=False)
    routedlora.inject(model, cfg)
    assert not any(m.training for m in model.modules())
    inputs = make_inputs("llama", B=2)
    with torch.no_grad():  # eval routing is deterministic
        assert torch.equal(routed_run(model, inputs, [0, 1]), routed_run(model, inputs, [0, 1]))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_init_leaves_outputs_exactly_unchanged(kind):
    builder, targets = SPECS[kind][:2]
    base = builder()
    model = copy.deepcopy(base)
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=targets, n_tasks=3, n_skills=3, r=4,
                                                         n_heads=2, init_weights=True))
    spread_logits(model)  # routing weights do not matter while B = 0
    inputs = make_inputs(kind)
    with torch.no_grad():
        ref = run(base, inputs)
        for task_ids in ([0, 1, 2], 2, torch.tensor([2, 2, 0])):
            assert torch.equal(routed_run(model, inputs, task_ids), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_differ_per_task_and_gradients_reach_only_adapters(kind):
    base = SPECS[kind][0]()
    model = injected(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        outs = [routed_run(model, inputs, t) for t in range(3)]
        ref = run(base, inputs)
    for t in range(3):
        assert_differs(outs[t], ref)
        for u in range(t):
            assert_differs(outs[t], outs[u])

    model.train()
    with routedlora.routing(model, torch.tensor([0, 1, 2])):
        run(model, inputs).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ADAPTER_PARAMS:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def _train_grads(model, inputs, tasks, *, backward_inside=True):
    """Gradients of one training step (Gumbel noise on) from a fixed RNG state."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    for _, layer in routedlora.routed_layers(model):
        layer._noise_step.zero_()  # restart each layer's seeded noise stream
    with routedlora.routing(model, tasks):
        loss = model(**inputs).logits.pow(2).mean()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _checkpointing_pair(seed):
    base = make_llama()
    cfg = routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=3, r=4,
                                      init_weights=False, seed=seed)
    plain = routedlora.inject(copy.deepcopy(base), cfg)
    spread_logits(plain)
    ckpt = copy.deepcopy(plain)
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()
    return plain, ckpt


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_gradient_checkpointing_gives_the_same_gradients():
    """HF gradient checkpointing re-runs the layers in backward; torch's global RNG is replayed."""
    plain, ckpt = _checkpointing_pair(seed=None)
    inputs, tasks = make_inputs("llama", B=3), [0, 1, 2]
    _assert_same_grads(_train_grads(plain, inputs, tasks), _train_grads(ckpt, inputs, tasks))


def test_gradient_checkpointing_with_seeded_noise_gives_the_same_gradients():
    plain, ckpt = _checkpointing_pair(seed=0)
    inputs, tasks = make_inputs("llama", B=3), [0, 1, 2]
    _assert_same_grads(_train_grads(plain, inputs, tasks), _train_grads(ckpt, inputs, tasks))


def test_gradient_checkpointing_backward_after_routing_block():
    plain, ckpt = _checkpointing_pair(seed=None)
    inputs, tasks = make_inputs("llama", B=3), [0, 1, 2]
    ref = _train_grads(plain, inputs, tasks, backward_inside=False)
    _assert_same_grads(ref, _train_grads(ckpt, inputs, tasks, backward_inside=False))


# ---------------------------------------------------------------------------------------
# 2. routing: per sequence, scalar, per token
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_example_alone(kind):
    model = injected(kind)
    inputs = make_inputs(kind, B=3)
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = routed_run(model, inputs, tasks)
        for i in range(3):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            alone = routed_run(model, one, tasks[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
            # the same example under another task gives another output
            other = routed_run(model, one, torch.tensor([(int(tasks[i]) + 1) % 3]))
            assert_differs(mixed[i:i + 1], other)


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_and_per_token_task_ids(kind):
    model = injected(kind)
    inputs = make_inputs(kind, B=2, S=6)
    with torch.no_grad():
        per_seq = routed_run(model, inputs, torch.tensor([1, 1]))
        for scalar in (1, torch.tensor(1)):
            torch.testing.assert_close(routed_run(model, inputs, scalar), per_seq, rtol=0, atol=0)
        # per-token ids that are constant along each sequence == per-sequence ids
        tasks = torch.tensor([2, 0])
        per_token = tasks[:, None].expand(2, 6).contiguous()
        torch.testing.assert_close(routed_run(model, inputs, per_token), routed_run(model, inputs, tasks),
                                   rtol=1e-5, atol=1e-5)
        # tokens of one sequence on different tasks really are routed per token
        mixed = torch.tensor([[0, 0, 0, 2, 2, 2], [1, 2, 1, 2, 1, 2]])
        out = routed_run(model, inputs, mixed)
        assert_differs(out, routed_run(model, inputs, torch.tensor([0, 1])))


def test_per_token_routing_respects_causality_on_llama():
    """Positions before the first token of task b see only task a's tokens: same output as all-a."""
    model = injected("llama")
    inputs = make_inputs("llama", B=2, S=8)
    k = 5
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[:, k:] = 2
    with torch.no_grad():
        split = routed_run(model, inputs, ids)
        all_a = routed_run(model, inputs, 0)
        all_b = routed_run(model, inputs, 2)
    torch.testing.assert_close(split[:, :k], all_a[:, :k], rtol=1e-5, atol=1e-5)
    assert_differs(split[:, k:], all_a[:, k:])
    assert_differs(split[:, k:], all_b[:, k:])  # positions >= k also attend to task-a tokens


def test_routing_context_is_restored():
    model = injected("llama")
    inputs = make_inputs("llama", B=2)
    before = dict(model.__dict__)
    layer_attrs = {name: dict(layer.__dict__) for name, layer in routedlora.routed_layers(model)}
    with routedlora.routing(model, [0, 1]) as state:
        assert dict(model.__dict__) == before  # the block changes no attribute of the model
        assert torch.equal(state.task_ids, torch.tensor([0, 1]))
        with torch.no_grad():
            inner = run(model, inputs)
            with routedlora.routing(model, 2):  # nesting routes by the innermost ids
                assert_differs(run(model, inputs), inner)
            torch.testing.assert_close(run(model, inputs), inner, rtol=0, atol=0)
    assert dict(model.__dict__) == before
    assert all(routedlora.context.current(layer) is None for _, layer in routedlora.routed_layers(model))
    assert all(dict(layer.__dict__) == layer_attrs[name] for name, layer in routedlora.routed_layers(model))
    with pytest.raises(ValueError, match="routing"):
        run(model, inputs)
    routedlora.eject(model)
    assert "generate" not in model.__dict__  # the generate wrapper goes with the layers


def test_batch_size_mismatch_raises_outside_generate():
    model = injected("llama")
    inputs = make_inputs("llama", B=3)
    for bad in ([0, 1], [0, 1, 2, 0], torch.zeros(3, 5, dtype=torch.long)):
        with routedlora.routing(model, bad):
            with pytest.raises(ValueError, match="task_ids"):
                run(model, inputs)


# ---------------------------------------------------------------------------------------
# 3. generate()
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_no_cache(model, input_ids, n):
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    ids, logits = input_ids, []
    for _ in range(n):
        step = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


@torch.no_grad()
def t5_greedy_no_cache(model, input_ids, n):
    dec, logits = torch.zeros(input_ids.shape[0], 1, dtype=torch.long), []
    for _ in range(n):
        step = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), decoder_input_ids=dec,
                     use_cache=False).logits[:, -1]
        logits.append(step)
        dec = torch.cat([dec, step.argmax(-1, keepdim=True)], dim=1)
    return dec, torch.stack(logits, dim=1)


class SeqLenRecorder:
    """Records the sequence length of every input a routed layer sees."""

    def __init__(self, layer):
        self.lengths = []
        self.handle = layer.register_forward_pre_hook(lambda mod, args: self.lengths.append(args[0].shape[1]))

    def remove(self):
        self.handle.remove()


def _gen(model, input_ids, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          return_dict_in_generate=True, **kw)


def test_llama_greedy_generate_with_kv_cache_matches_no_cache_loop():
    model = injected("llama")
    x = make_inputs("llama", B=3, S=5)["input_ids"]
    tasks = torch.tensor([2, 0, 1])
    n = 6
    rec = SeqLenRecorder(routedlora.routed_layers(model)[0][1])
    try:
        with routedlora.routing(model, tasks), torch.no_grad():
            out = _gen(model, x, max_new_tokens=n, num_beams=1, use_cache=True, output_logits=True)
            cached_lengths = list(rec.lengths)
            ref_ids, ref_logits = greedy_no_cache(model, x, n)
    finally:
        rec.remove()
    assert cached_lengths == [5] + [1] * (n - 1)  # the decode steps really ran one token on the cache
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, rtol=1e-4, atol=1e-4)
    # and each row is decoded with its own task
    with routedlora.routing(model, tasks.flip(0)):
        _, flipped = greedy_no_cache(model, x, 1)
    assert_differs(flipped[:, 0], ref_logits[:, 0])


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_llama_beam_search_routes_each_example_beams_by_its_task(num_return_sequences):
    model = injected("llama")
    x = make_inputs("llama", B=2, S=5)["input_ids"]
    tasks = [0, 2]
    kw = dict(max_new_tokens=5, num_beams=2, num_return_sequences=num_return_sequences, output_scores=True)
    with routedlora.routing(model, torch.tensor(tasks)), torch.no_grad():
        out = _gen(model, x, **kw)
    nr = num_return_sequences
    assert out.sequences.shape == (2 * nr, 10)
    for i, t in enumerate(tasks):
        with routedlora.routing(model, [t]), torch.no_grad():
            alone = _gen(model, x[i:i + 1], **kw)
        with routedlora.routing(model, [2 - t]), torch.no_grad():
            wrong = _gen(model, x[i:i + 1], **kw)
        assert torch.equal(out.sequences[i * nr:(i + 1) * nr], alone.sequences)
        torch.testing.assert_close(out.sequences_scores[i * nr:(i + 1) * nr], alone.sequences_scores,
                                   rtol=1e-4, atol=1e-5)
        assert_differs(out.sequences_scores[i * nr:(i + 1) * nr], wrong.sequences_scores, tol=1e-5)


def test_llama_sampling_with_num_return_sequences_routes_each_copy():
    model = injected("llama")
    x = make_inputs("llama", B=2, S=5)["input_ids"]
    tasks = [1, 2]
    torch.manual_seed(0)
    with routedlora.routing(model, tasks), torch.no_grad():
        out = _gen(model, x, max_new_tokens=3, do_sample=True, num_return_sequences=3, output_logits=True)
    assert out.sequences.shape == (6, 8)
    first = out.logits[0]  # prefill logits: independent of the sampled tokens
    with torch.no_grad():
        for i, t in enumerate(tasks):
            ref = routed_run(model, {"input_ids": x[i:i + 1], "attention_mask": torch.ones(1, 5, dtype=torch.long)},
                             [t])[:, -1]
            torch.testing.assert_close(first[3 * i:3 * i + 3], ref.expand(3, -1), rtol=1e-4, atol=1e-4)


def test_generate_with_wrong_number_of_task_ids_raises():
    model = injected("llama")
    x = make_inputs("llama", B=2, S=4)["input_ids"]
    with routedlora.routing(model, [0, 1, 2]):
        with pytest.raises(ValueError, match="task_ids"):
            _gen(model, x, max_new_tokens=2)
    with routedlora.routing(model, [0, 1, 2]):
        with pytest.raises(ValueError, match="task_ids"):
            _gen(model, x, max_new_tokens=2, num_beams=2)


def test_t5_generate_with_routing_greedy_and_beams():
    model = injected("t5")
    x = make_inputs("t5", B=2, S=6)["input_ids"]
    tasks = torch.tensor([1, 2])
    n = 5
    with routedlora.routing(model, tasks), torch.no_grad():
        out = _gen(model, x, max_new_tokens=n, num_beams=1, output_logits=True)
        ref_ids, ref_logits = t5_greedy_no_cache(model, x, n)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, rtol=1e-4, atol=1e-4)

    kw = dict(max_new_tokens=n, num_beams=2, num_return_sequences=2, output_scores=True)
    with routedlora.routing(model, tasks), torch.no_grad():
        beams = _gen(model, x, **kw)
    assert beams.sequences.shape == (4, n + 1)
    for i in range(2):
        with routedlora.routing(model, tasks[i:i + 1]), torch.no_grad():
            alone = _gen(model, x[i:i + 1], **kw)
        assert torch.equal(beams.sequences[2 * i:2 * i + 2], alone.sequences)
        torch.testing.assert_close(beams.sequences_scores[2 * i:2 * i + 2], alone.sequences_scores,
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 4. MTA
# ---------------------------------------------------------------------------------------

def mta_llama(seed=0):
    model = make_llama(seed)
    cfg = routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=4, r=4,
                                      router="mta", top_k=2, n_shared=2, gate_hidden=16, init_weights=False)
    routedlora.inject(model, cfg)
    return model.eval()


@torch.no_grad()
def randomize_stage2(model, seed=7):
    """Shared skills and gate start as a no-op / constant; make them matter (and input dependent)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in routedlora.routed_layers(model):
        layer.shared_B.copy_(torch.randn(layer.shared_B.shape, generator=g) * 0.5)
        for lin in (layer.gate[0], layer.gate[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 2.0)
            if lin.bias is not None:  # the tanh gate's; ALTER's gate has none
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))


def _backward_grads(model, inputs, tasks):
    model.zero_grad(set_to_none=True)
    with routedlora.routing(model, tasks):
        run(model, inputs).pow(2).mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_mta_two_stages_train_the_right_parameters():
    model = mta_llama()
    layers = routedlora.routed_layers(model)
    assert {n for n, _ in layers} == _names(_LLAMA_ATTN, ["q_proj", "v_proj"])
    assert all(type(layer) is routedlora.MTALinear and layer.mta_stage == 1 for _, layer in layers)
    names = {n for n, _ in layers}
    stage1 = _names(names, ADAPTER_PARAMS)
    stage2 = {f"{ln}.{p}" for ln in names for p, _ in model.get_submodule(ln).named_parameters()
              if p.split(".")[0] in MTA_STAGE2_PARAMS}
    assert stage2 >= _names(names, ["shared_A", "shared_B", "gate.0.weight", "gate.2.weight"])
    inputs = make_inputs("llama", B=3)
    tasks = torch.tensor([0, 1, 2])

    assert trainable(model) == stage1
    model.train()
    assert _backward_grads(model, inputs, tasks) == stage1

    assert routedlora.mta_stage2(model) is model
    assert all(layer.mta_stage == 2 for _, layer in layers)
    assert trainable(model) == stage2
    randomize_stage2(model)
    assert _backward_grads(model, inputs, tasks) == stage2


def test_mta_stage2_generate_with_kv_cache_matches_no_cache_loop():
    model = mta_llama()
    x = make_inputs("llama", B=3, S=5, seed=3)["input_ids"]
    tasks = torch.tensor([1, 2, 0])
    with routedlora.routing(model, tasks), torch.no_grad():
        _, stage1_logits = greedy_no_cache(model, x, 1)
    routedlora.mta_stage2(model)
    randomize_stage2(model)
    model.eval()
    n = 6
    rec = SeqLenRecorder(routedlora.routed_layers(model)[0][1])
    try:
        with routedlora.routing(model, tasks), torch.no_grad():
            out = _gen(model, x, max_new_tokens=n, num_beams=1, use_cache=True, output_logits=True)
            lengths = list(rec.lengths)
            ref_ids, ref_logits = greedy_no_cache(model, x, n)
    finally:
        rec.remove()
    assert lengths == [5] + [1] * (n - 1)
    assert_differs(ref_logits[:, 0], stage1_logits[:, 0])  # shared skills and gate are live
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, rtol=1e-4, atol=1e-4)

    # beams: each example's beams gated and routed as when that example runs alone
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, output_scores=True)
    with routedlora.routing(model, tasks), torch.no_grad():
        beams = _gen(model, x, **kw)
    for i in range(3):
        with routedlora.routing(model, tasks[i:i + 1]), torch.no_grad():
            alone = _gen(model, x[i:i + 1], **kw)
        assert torch.equal(beams.sequences[2 * i:2 * i + 2], alone.sequences)
        torch.testing.assert_close(beams.sequences_scores[2 * i:2 * i + 2], alone.sequences_scores,
                                   rtol=1e-4, atol=1e-5)


def test_mta_stage2_mixed_batch_and_per_token_ids():
    model = mta_llama()
    routedlora.mta_stage2(model)
    randomize_stage2(model)
    inputs = make_inputs("llama", B=3)
    tasks = torch.tensor([2, 1, 0])
    with torch.no_grad():
        mixed = routed_run(model, inputs, tasks)
        for i in range(3):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(mixed[i:i + 1], routed_run(model, one, tasks[i:i + 1]), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="task_ids"):
            routed_run(model, inputs, torch.zeros(3, 6, dtype=torch.long))


def test_mta_one_token_forward_does_not_reuse_an_unrelated_gate():
    model = mta_llama()
    routedlora.mta_stage2(model)
    randomize_stage2(model)
    first = make_inputs("llama", B=2, S=6, seed=1)
    single = make_inputs("llama", B=2, S=1, seed=9)
    with torch.no_grad():
        ref = routed_run(model, single, [0, 1])
        with routedlora.routing(model, [0, 1]):
            run(model, first)
            again = run(model, single)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 5. save / load
# ---------------------------------------------------------------------------------------

def test_save_load_roundtrip_into_fresh_model(tmp_path):
    from safetensors import safe_open

    base = make_llama()
    model = copy.deepcopy(base)
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=3,
                                                         r=4, n_heads=2, init_weights=False))
    model.eval()
    spread_logits(model)
    path = tmp_path / "adapter.safetensors"
    routedlora.save_adapter(model, path)

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        numel = sum(f.get_tensor(k).numel() for k in keys)
    layers = _names(_LLAMA_ATTN, ["q_proj", "v_proj"])
    assert keys == _names(layers, ADAPTER_PARAMS)
    assert not any("base_layer" in k or "embed" in k for k in keys)
    assert numel == sum(p.numel() for _, layer in routedlora.routed_layers(model)
                        for p in layer.adapter_state().values())
    assert meta["format"] == "routedlora/1"

    fresh = copy.deepcopy(base)
    assert routedlora.load_adapter(fresh, path) is fresh
    fresh.eval()
    assert routed_names(fresh) == layers
    assert trainable(fresh) == trainable(model)
    assert routedlora.model_config(fresh) == routedlora.model_config(model)
    inputs = make_inputs("llama", B=3)
    with torch.no_grad():
        for tasks in ([0, 1, 2], 2):
            torch.testing.assert_close(routed_run(fresh, inputs, tasks), routed_run(model, inputs, tasks),
                                       rtol=0, atol=0)

    # loading into a model that already has (other) adapters of the same layout overwrites them
    other = copy.deepcopy(base)
    routedlora.inject(other, routedlora.model_config(model))
    routedlora.load_adapter(other, path)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(routed_run(other, inputs, [2, 0, 1]), routed_run(model, inputs, [2, 0, 1]),
                                   rtol=0, atol=0)


def test_save_load_mta_stage2(tmp_path):
    model = mta_llama()
    routedlora.mta_stage2(model)
    randomize_stage2(model)
    path = tmp_path / "mta.safetensors"
    routedlora.save_adapter(model, path)
    fresh = routedlora.load_adapter(make_llama(), path).eval()
    assert all(type(layer) is routedlora.MTALinear and layer.mta_stage == 2
               for _, layer in routedlora.routed_layers(fresh))
    inputs = make_inputs("llama", B=3)
    with torch.no_grad():
        torch.testing.assert_close(routed_run(fresh, inputs, [0, 2, 1]), routed_run(model, inputs, [0, 2, 1]),
                                   rtol=0, atol=0)


def test_load_mta_stage2_trains_the_stage2_parameters(tmp_path):
    model = mta_llama()
    routedlora.mta_stage2(model)
    path = tmp_path / "mta.safetensors"
    routedlora.save_adapter(model, path)
    fresh = routedlora.load_adapter(make_llama(), path)
    assert trainable(fresh) == trainable(model)


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_untouched(model, snap, inputs, ref_out):
    state, flags, types = snap
    assert not routedlora.routed_layers(model)
    assert routedlora.model_config(model) is None
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    with torch.no_grad():
        assert torch.equal(run(model, inputs), ref_out)


def test_load_mismatched_shapes_raises_and_leaves_fresh_model_unchanged(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = injected("llama")
    path = tmp_path / "adapter.safetensors"
    routedlora.save_adapter(model, path)
    inputs = make_inputs("llama", B=2)

    # (a) a base model of another width: the saved layout does not fit
    wide = make_llama(hidden=64)
    wide.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a custom flag that must survive
    snap = _snapshot(wide)
    with torch.no_grad():
        ref = run(wide, inputs)
    with pytest.raises(ValueError, match="shape"):
        routedlora.load_adapter(wide, path)
    _assert_untouched(wide, snap, inputs, ref)

    # (b) a tampered file: right names, one tensor of the wrong shape
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.1.self_attn.v_proj.lora_B"
    tensors[key] = tensors[key][..., :-1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    fresh = make_llama()
    snap = _snapshot(fresh)
    with torch.no_grad():
        ref = run(fresh, inputs)
    with pytest.raises(ValueError, match="lora_B"):
        routedlora.load_adapter(fresh, bad)
    _assert_untouched(fresh, snap, inputs, ref)

    # (c) an injected model with another rank keeps its own adapter
    other = make_llama()
    routedlora.inject(other, routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=3,
                                                         r=2, init_weights=False))
    other.eval()
    before = {k: v.detach().clone() for k, v in routedlora.adapter_state_dict(other).items()}
    with torch.no_grad():
        ref = routed_run(other, inputs, [0, 1])
    with pytest.raises(ValueError, match="shape"):
        routedlora.load_adapter(other, path)
    after = routedlora.adapter_state_dict(other)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(routed_run(other, inputs, [0, 1]), ref)


# ---------------------------------------------------------------------------------------
# 6. merge
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_routed_output_and_unmerge_restores(kind):
    model = injected(kind, n_heads=2)
    inputs = make_inputs(kind, B=2)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in routedlora.routed_layers(model)}
    with torch.no_grad():
        routed = routed_run(model, inputs, 1)
        routed0 = routed_run(model, inputs, 0)
    assert routedlora.merge(model, 1) is model
    assert all(layer.merged_task == 1 for _, layer in routedlora.routed_layers(model))
    assert any(not torch.allclose(layer.base_layer.weight, weights[n]) for n, layer in routedlora.routed_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), routed, rtol=1e-5, atol=1e-5)  # no routing needed
        torch.testing.assert_close(routed_run(model, inputs, [1, 1]), routed, rtol=1e-5, atol=1e-5)
    for other in (0, [1, 0], torch.tensor([2, 2])):
        with pytest.raises(ValueError, match="task_ids"):
            with routedlora.routing(model, other):
                pass
    with pytest.raises(ValueError):
        routedlora.merge(model, 0)  # already merged
    assert routedlora.unmerge(model) is model
    for n, layer in routedlora.routed_layers(model):
        assert layer.merged_task is None
        torch.testing.assert_close(layer.base_layer.weight, weights[n], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(routed_run(model, inputs, 0), routed0, rtol=1e-5, atol=1e-5)


def test_merge_rejects_bad_task_and_mta_stage2():
    model = injected("llama")
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="task_id"):
            routedlora.merge(model, bad)
    assert all(layer.merged_task is None for _, layer in routedlora.routed_layers(model))
    mta = mta_llama()
    routedlora.mta_stage2(mta)
    with pytest.raises(ValueError, match="merge"):
        routedlora.merge(mta, 0)


# ---------------------------------------------------------------------------------------
# 7. errors
# ---------------------------------------------------------------------------------------

def test_inject_errors_leave_model_untouched():
    model = make_llama()
    inputs = make_inputs("llama", B=2)
    with torch.no_grad():
        ref = run(model, inputs)
    snap = _snapshot(model)

    with pytest.raises(ValueError, match="target_modules"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["nope"], n_tasks=2))
    with pytest.raises(ValueError, match="target_modules"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=r"model\.layers\.9\..*", n_tasks=2))
    _assert_untouched(model, snap, inputs, ref)

    # q_proj (32 -> 32) takes 32 heads, k_proj (32 -> 16) does not: fails after a good match
    with pytest.raises(ValueError, match="n_heads"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj", "k_proj"], n_tasks=2,
                                                             n_heads=32))
    with pytest.raises(ValueError, match="n_heads"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj"], n_tasks=2, n_heads=3))
    _assert_untouched(model, snap, inputs, ref)

    with pytest.raises(TypeError, match="target_modules"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["embed_tokens"], n_tasks=2))
    _assert_untouched(model, snap, inputs, ref)


def test_inject_twice_raises():
    model = injected("llama")
    names = routed_names(model)
    with pytest.raises(ValueError, match="already"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["k_proj"], n_tasks=2))
    assert routed_names(model) == names


def test_routing_task_id_errors():
    model = injected("llama")  # 3 tasks
    inputs = make_inputs("llama", B=2)
    for bad in (3, [0, 3], torch.tensor([0, 7]), -1, [0, -1], torch.full((2, 6), 3)):
        with pytest.raises(ValueError, match="task_ids"):
            with routedlora.routing(model, bad):
                run(model, inputs)
    for bad in (torch.tensor([0.0, 1.0]), [0.0, 1.0], 1.0, torch.tensor([True, False]), True):
        with pytest.raises(TypeError, match="task_ids"):
            with routedlora.routing(model, bad):
                run(model, inputs)
    with pytest.raises(ValueError, match="routing"):
        run(model, inputs)
    # routing a model without routed layers
    with pytest.raises(ValueError, match="inject"):
        with routedlora.routing(make_llama(), 0):
            pass
