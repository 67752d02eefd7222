"""routedlora.export_task_loras: each task of a routed model as a PEFT LoRA folder.

Every exported folder, loaded with ``peft.PeftModel.from_pretrained`` on a fresh copy of the
base model, must compute what the routed model computes for that task in eval mode (float32,
1e-5). Tiny Llama, T5, BERT and GPT-2 (Conv1D) models built from configs; no downloads.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import routedlora
from routedlora.export import export_task_loras, main, task_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB, T = 64, 4


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=None, eos_token_id=None))


def _t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, dropout_rate=0.0,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _bert():
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=48,
                                                    max_position_embeddings=32, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, num_labels=3))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


# family: (builder, targets, PEFT task type)
FAMILIES = {
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
    "t5": (_t5, ["q", "v", "wo"], "SEQ_2_SEQ_LM"),
    "bert": (_bert, ["query", "value"], "SEQ_CLS"),
    "gpt2": (_gpt2, ["c_attn", "c_fc"], "CAUSAL_LM"),  # transformers Conv1D
}
M, R, K = 3, 2, 2
# router options -> exported rank
ROUTERS = {
    "poly": (dict(router="poly"), R),
    "mhr2": (dict(router="poly", n_heads=2), R),
    "cpoly": (dict(router="cpoly"), R),
    "topk": (dict(router="topk", top_k=K), K * R),
    "mta_dense": (dict(router="mta"), M * R),
    "mta_topk": (dict(router="mta", mta_routing="topk", top_k=K), K * R),
}
# a spread of (family, router) pairs that touches every family and every router without the full product
CASES = [("llama", "poly"), ("llama", "mta_dense"), ("t5", "mhr2"), ("t5", "mta_topk"),
         ("bert", "cpoly"), ("gpt2", "topk"), ("gpt2", "mhr2")]


def _base(family: str):
    torch.manual_seed(0)
    return FAMILIES[family][0]().float().eval()


def _routed(family: str, router, base=None, **extra):
    model = copy.deepcopy(base if base is not None else _base(family))
    kw = dict(dict(n_skills=M), **(ROUTERS[router][0] if isinstance(router, str) else router), **extra)
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=FAMILIES[family][1], n_tasks=T,
                                                         r=R, alpha=3.0, **kw))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give every task a delta of its own
        for _, layer in routedlora.routed_layers(model):
            layer.lora_B.normal_(0, 0.5)
            layer.router_logits.normal_()
    return model.eval()


def _inputs(family: str):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (2, 6), generator=g)
    if family == "t5":
        return dict(input_ids=ids, decoder_input_ids=torch.randint(2, VOCAB, (2, 4), generator=g))
    return dict(input_ids=ids)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family,router", CASES)
def test_peft_lora_reproduces_each_task(family, router, tmp_path):
    base = _base(family)
    model = _routed(family, router, base)
    model.train()  # export routes in eval mode whatever the model's mode, and leaves the mode alone
    written = export_task_loras(model, tmp_path / "out")
    assert model.training
    model.eval()
    assert sorted(written) == list(range(T))
    inputs = _inputs(family)
    plain = _out(base, inputs)
    rank = ROUTERS[router][1]
    for t in (0, T - 1):
        folder = written[t]
        assert folder == os.path.join(str(tmp_path / "out"), f"task_{t}")
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
        assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == rank
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        assert cfg["task_type"] == FAMILIES[family][2]
        assert cfg["fan_in_fan_out"] is (family == "gpt2")
        assert cfg["target_modules"] == [n for n, _ in routedlora.routed_layers(model)]
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        # PEFT's SEQ_CLS model keeps the classification head in modules_to_save: it travels with each task
        heads = ["classifier"] if family == "bert" else None
        assert cfg["modules_to_save"] == heads
        assert len(tensors) == 2 * len(cfg["target_modules"]) + (2 if heads else 0)
        assert all(k.startswith("base_model.model.") for k in tensors)
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        with routedlora.routing(model, t):
            want = _out(model, inputs)
        got = _out(served, inputs)
        assert (want - plain).abs().max() > 0.05 * plain.abs().max()  # the task's adapter does something
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# router options, each with its exported rank: every one is respected because the export routes with the layer's own
# evaluation routing
OPTIONS = [
    (dict(router="cpoly", n_heads=2, cpoly_fixed_specific=True), R),
    (dict(router="cpoly", n_heads=2, cpoly_tied_heads=True, n_specific=2), R),
    (dict(router="poly", router_selector="private", n_skills=T, gumbel=False), R),
    (dict(router="poly", n_heads=4, router_shared_skill=True, router_average_correction=True), R),
    (dict(router="poly", router_l2_norm=True, router_granularity="block", gumbel=False), R),
    (dict(router="softmax", temperature=0.5, n_heads=2), R),
    (dict(router="topk", top_k=3, renormalize=False, temperature=2.0), 3 * R),
    (dict(router="mta", mta_init="own_skill", mta_routing="topk", top_k=1), R),
]


@pytest.mark.parametrize("options,rank", OPTIONS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items())
                         if isinstance(v, dict) else str(v))
def test_router_options(options, rank, tmp_path):
    base = _base("llama")
    model = _routed("llama", options, base)
    written = export_task_loras(model, tmp_path, tasks=[1])
    assert json.load(open(os.path.join(written[1], "adapter_config.json")))["r"] == rank
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), written[1]).eval()
    inputs = _inputs("llama")
    with routedlora.routing(model, 1):
        want = _out(model, inputs)
    torch.testing.assert_close(_out(served, inputs), want, atol=1e-5, rtol=1e-5)


def test_dtype_is_kept(tmp_path):
    model = _routed("llama", "mhr2", _base("llama").to(torch.bfloat16))
    written = export_task_loras(model, tmp_path, tasks=[0])
    tensors = load_file(os.path.join(written[0], "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_exported_lora_equals_task_delta_weight():
    # the factors multiply to exactly the delta that merge() folds in, heads' cross terms included
    model = _routed("llama", "mhr2", router_granularity="model")
    for _, layer in routedlora.routed_layers(model):
        for t in range(T):
            A, B = task_lora(layer, t)
            assert A.shape[1] == R
            torch.testing.assert_close((A @ B).T, layer.task_delta_weight(t), atol=1e-6, rtol=1e-6)


def test_subset_of_tasks_and_per_module_ranks(tmp_path):
    base = _base("llama")
    model = _routed("llama", "poly", base)
    # one layer built by hand with a rank of its own: the config needs rank_pattern/alpha_pattern
    mlp = model.model.layers[1].mlp
    mlp.up_proj = routedlora.RoutedLoraLinear(mlp.up_proj, n_tasks=T, n_skills=2, r=5, alpha=2.0, router="poly").eval()
    with torch.no_grad():
        mlp.up_proj.lora_B.normal_()
    written = export_task_loras(model, tmp_path, tasks=[2])
    assert list(written) == [2] and os.listdir(tmp_path) == ["task_2"]
    cfg = json.load(open(os.path.join(written[2], "adapter_config.json")))
    assert cfg["r"] == R and cfg["rank_pattern"] == {"model.layers.1.mlp.up_proj": 5}
    assert cfg["alpha_pattern"] == {"model.layers.1.mlp.up_proj": 5}
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), written[2]).eval()
    inputs = _inputs("llama")
    with routedlora.routing(model, 2):
        want = _out(model, inputs)
    torch.testing.assert_close(_out(served, inputs), want, atol=1e-5, rtol=1e-5)


def _assert_refused(model, out_dir, match, **kw):
    before = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    with pytest.raises(ValueError, match=match):
        export_task_loras(model, out_dir, **kw)
    after = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    assert before == after  # nothing written


def test_refusals(tmp_path):
    out = tmp_path / "out"
    model = _routed("llama", "poly")
    for tasks in ([T], [-1], [0, 0], []):
        _assert_refused(model, out, "tasks", tasks=tasks)
    with pytest.raises(TypeError, match="tasks"):
        export_task_loras(model, out, tasks=[True])
    _assert_refused(model, out, "task_type", task_type="CAUSAL")
    routedlora.merge(model, 1)
    _assert_refused(model, out, "merged")
    routedlora.unmerge(model)
    mta = _routed("llama", "mta_dense")
    routedlora.mta_stage2(mta)
    _assert_refused(mta, out, "stage 2")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _assert_refused(model, out, "not empty")
    (tmp_path / "file").write_text("x")
    _assert_refused(model, tmp_path / "file", "not a directory")
    with pytest.raises(ValueError, match="no routed LoRA layers"):
        export_task_loras(_base("llama"), tmp_path / "plain")


def test_overwrite_replaces_task_folders_only(tmp_path):
    model = _routed("llama", "poly")
    export_task_loras(model, tmp_path, tasks=[0, 1])
    (tmp_path / "notes.txt").write_text("kept")
    old = load_file(str(tmp_path / "task_0" / "adapter_model.safetensors"))
    with torch.no_grad():
        for _, layer in routedlora.routed_layers(model):
            layer.lora_B.mul_(2)
    written = export_task_loras(model, tmp_path, tasks=[0], overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "task_0", "task_1"]  # no temporary folders left
    new = load_file(os.path.join(written[0], "adapter_model.safetensors"))
    key = next(k for k in new if k.endswith("lora_B.weight"))
    torch.testing.assert_close(new[key], 2 * old[key])


def test_cli_on_tiny_model(tmp_path, capsys):
    from routedlora.training.data import CharTokenizer
    from routedlora.training.models import build_model

    base = build_model("tiny-llama", vocab_size=CharTokenizer().vocab_size, hidden=32, layers=1)
    model = copy.deepcopy(base).eval()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3,
                                                         n_skills=2, r=2, router="mta", mta_routing="topk",
                                                         top_k=1))
    with torch.no_grad():
        for _, layer in routedlora.routed_layers(model):
            layer.lora_B.normal_()
    (tmp_path / "step_1").mkdir()
    routedlora.save_adapter(model, tmp_path / "step_1" / "adapter.safetensors")
    out = tmp_path / "out"
    args = [str(tmp_path / "step_1"), str(out), "--model", "tiny-llama", "--hidden", "32", "--layers", "1"]
    assert main(args + ["--tasks", "0,2"]) == 0
    assert sorted(os.listdir(out)) == ["task_0", "task_2"]
    assert "task 2:" in capsys.readouterr().out
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / "task_2")).eval()
    ids = torch.randint(3, 20, (2, 5))
    with routedlora.routing(model, 2):
        want = _out(model, dict(input_ids=ids))
    torch.testing.assert_close(_out(served, dict(input_ids=ids)), want, atol=1e-5, rtol=1e-5)
    # user mistakes: one line on stderr, exit code 2
    for extra, match in ((["--tasks", "0,x"], "--tasks"), (["--tasks", "3", "--overwrite"], "out of range"),
                         ([], "not empty"), (["--layers", "2", "--overwrite"], "")):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1
    assert sorted(os.listdir(out)) == ["task_0", "task_2"]


def test_cli_module_entry_reports_missing_adapter(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "routedlora.export", str(tmp_path / "missing.safetensors"),
                           str(tmp_path / "out"), "--model", "tiny-llama"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ADAPTER:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
