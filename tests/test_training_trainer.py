"""Mixed-task trainer: sampler mixing, exact resume, recipes, seq2seq, option checks."""
import math

import pytest
import torch

import routedlora
from routedlora.training import (CharTokenizer, MultiTaskTrainer, TaskSampler, TrainConfig, apply_recipe,
                                 collate, matched_lora_rank, mixing_probs, recipe_config, synthetic_tasks)
from routedlora.training.models import default_targets, tiny_llama, tiny_t5

TASK_NAMES = ["copy", "reverse", "shift"]

pytestmark = pytest.mark.usefixtures("one_thread")


def data(sizes=(40, 20, 10), seed=0):
    return synthetic_tasks(TASK_NAMES, list(sizes), length=4, seed=seed)


def make(recipe="poly", steps=8, model="llama", noise_seed=None, stage2_at=None, **cfg):
    tok = CharTokenizer()
    build = tiny_llama if model == "llama" else tiny_t5
    m = build(tok.vocab_size, hidden=16, layers=1, seed=0)
    over = apply_recipe(m, recipe, n_tasks=3, target_modules=default_targets(m), n_skills=3, r=2,
                        n_heads=2 if recipe == "mhr" else None, seed=noise_seed, mta_stage2_at=stage2_at)
    cfg.setdefault("log_every", 4)
    config = TrainConfig(steps=steps, batch_size=6, lr=1e-2, progress=False, **over, **cfg)
    return MultiTaskTrainer(m, data(), config, eval_tasks=data((5, 5, 5), seed=1), log=lambda s: None)


def test_mixing_probs():
    sizes = [100, 25, 4]
    torch.testing.assert_close(mixing_probs(sizes, "uniform"), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(mixing_probs(sizes, "proportional"), torch.tensor(sizes, dtype=torch.float64) / 129)
    p = mixing_probs(sizes, "temperature", temperature=2.0)
    torch.testing.assert_close(p, torch.tensor([10.0, 5.0, 2.0], dtype=torch.float64) / 17)
    torch.testing.assert_close(mixing_probs(sizes, "proportional", cap=25),
                               torch.tensor([25.0, 25.0, 4.0], dtype=torch.float64) / 54)
    for kwargs, match in [(dict(mixing="nope"), "mixing"), (dict(temperature=0.0), "temperature"),
                          (dict(cap=0), "cap")]:
        with pytest.raises(ValueError, match=match):
            mixing_probs(sizes, **kwargs)
    with pytest.raises(ValueError, match="sizes"):
        mixing_probs([3, 0])


def test_sampler_mixes_and_visits_every_example_once_per_epoch():
    s = TaskSampler([6, 3], mixing="uniform", seed=1)
    tasks, ex = s.sample(3000)
    assert abs(float((tasks == 0).double().mean()) - 0.5) < 0.05
    first = ex[tasks == 1][:3].sort().values
    assert first.tolist() == [0, 1, 2]  # one epoch of task 1, without replacement
    t1, _ = s.sample(8)
    assert len(set(t1.tolist())) == 2  # a batch mixes tasks
    state = s.state_dict()
    a = s.sample(16)
    s2 = TaskSampler([6, 3], mixing="uniform", seed=99)
    s2.load_state_dict(state)
    b = s2.sample(16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(0)
    with pytest.raises(ValueError, match="state"):
        TaskSampler([5, 3]).load_state_dict(state)


def test_collate_causal_and_seq2seq():
    ex = [{"prompt": [5, 6], "target": [7, 1]}, {"prompt": [5], "target": [8, 9, 1]}]
    b = collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [5, 8, 9, 1]]
    assert b["labels"].tolist() == [[-100, -100, 7, 1], [-100, 8, 9, 1]]
    s = collate(ex, pad_id=0, encoder_decoder=True)
    assert s["input_ids"].tolist() == [[5, 6], [5, 0]] and s["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert s["labels"].tolist() == [[7, 1, -100], [8, 9, 1]]


@pytest.mark.parametrize("case", ["poly-global-rng", "mhr-layer-seed", "mta-stage-switch", "t5-cpoly"])
def test_resume_replays_the_same_losses_bit_for_bit(tmp_path, case):
    kw = {"poly-global-rng": dict(recipe="poly"),
          "mhr-layer-seed": dict(recipe="mhr", noise_seed=3, schedule="cosine", warmup_steps=2,
                                 router_lr=0.1, max_grad_norm=1.0),
          "mta-stage-switch": dict(recipe="mta", stage2_at=5),
          "t5-cpoly": dict(recipe="cpoly", model="t5")}[case]
    full = make(steps=10, save_every=4, output_dir=str(tmp_path / "a"), **kw)
    torch.manual_seed(1234)
    ref = full.train()["loss"]
    assert len(ref) == 10 and all(math.isfinite(v) for v in ref)
    resumed = make(steps=10, output_dir=str(tmp_path / "b"), **kw)
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    got = resumed.train(resume_from=str(tmp_path / "a" / "step_8"))["loss"]
    assert got == ref  # bit for bit
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    # the final adapter loads into a fresh model with routedlora.load_adapter
    fresh = tiny_llama(CharTokenizer().vocab_size, hidden=16, layers=1) if kw.get("model") != "t5" else \
        tiny_t5(CharTokenizer().vocab_size, hidden=16, layers=1)
    routedlora.load_adapter(fresh, str(tmp_path / "b" / "final" / "adapter.safetensors"))
    assert torch.equal(routedlora.adapter_state_dict(fresh)[next(iter(routedlora.adapter_state_dict(fresh)))],
                       next(iter(routedlora.adapter_state_dict(resumed.model).values())))


def test_train_logs_per_task_and_evaluates():
    lines = []
    t = make(steps=8)
    t.log = lines.append
    hist = t.train()
    assert [r["step"] for r in hist["log"]] == [1, 4, 8]
    rec = hist["log"][-1]["tasks"]
    assert set(rec) == set(TASK_NAMES) and sum(v["examples"] for v in rec.values()) == 4 * 6
    assert set(hist["eval"][-1]["tasks"]["copy"]) == {"loss", "token_acc", "exact", "examples"} if hist["eval"] \
        else True
    res = t.evaluate()
    assert set(res) == set(TASK_NAMES) and 0 <= res["copy"]["token_acc"] <= 1
    assert any(line.startswith("step") for line in lines)


def test_adaptation_recipes(tmp_path):
    pre = make(steps=4, output_dir=str(tmp_path / "pre"))
    pre.train()
    path = str(tmp_path / "pre" / "final" / "adapter.safetensors")
    tok = CharTokenizer()
    few = synthetic_tasks(["swap"], 8, length=4)
    # MHR-z: one new routing row, only the logits train
    m = tiny_llama(tok.vocab_size, hidden=16, layers=1)
    over = apply_recipe(m, "mhr-z", n_tasks=1, init_adapter=path)
    assert over == {"task_routing": "task", "task_offset": 3}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    t = MultiTaskTrainer(m, few, TrainConfig(steps=3, batch_size=4, progress=False, **over), log=lambda s: None)
    t.train()
    changed = sorted({n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if not torch.equal(p, before[n])})
    assert changed == ["router_logits"]
    assert all(torch.equal(p[:3], before[n][:3]) for n, p in m.named_parameters() if n.endswith("router_logits"))
    # MHR-μ: the averaged LoRA trains, routed to the shared row
    m = tiny_llama(tok.vocab_size, hidden=16, layers=1)
    over = apply_recipe(m, "mhr-mu", n_tasks=1, init_adapter=path)
    assert over == {"task_routing": "shared"}
    t = MultiTaskTrainer(m, few, TrainConfig(steps=2, batch_size=4, progress=False, **over), log=lambda s: None)
    t.train()
    assert routedlora.routed_layers(m)[0][1].lora_A.shape[1] == 1
    with pytest.raises(ValueError, match="init_adapter"):
        apply_recipe(tiny_llama(tok.vocab_size, hidden=16, layers=1), "mhr-z", n_tasks=1)


def test_shared_lora_baseline_budget():
    tok = CharTokenizer()
    m = tiny_llama(tok.vocab_size, hidden=16, layers=1)
    targets = default_targets(m)
    routed = recipe_config("mhr", n_tasks=4, target_modules=targets, n_skills=4, r=4, n_heads=2)
    r = matched_lora_rank(m, routed)
    a = routedlora.inject(tiny_llama(tok.vocab_size, hidden=16, layers=1), routed)
    apply_recipe(m, "lora", n_tasks=4, target_modules=targets, r=r)
    from routedlora.training import adapter_parameters

    n_routed, n_lora = adapter_parameters(a), adapter_parameters(m)
    assert n_routed <= n_lora < n_routed * 1.1


def test_bad_options_name_the_argument():
    for kwargs, match in [(dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(mixing="x"), "mixing"),
                          (dict(schedule="x"), "schedule"), (dict(task_routing="x"), "task_routing"),
                          (dict(parallel="x"), "parallel"), (dict(batch_size=2.5), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)
    tok = CharTokenizer()
    m = tiny_llama(tok.vocab_size, hidden=16, layers=1)
    with pytest.raises(ValueError, match="model"):
        MultiTaskTrainer(m, data(), TrainConfig(progress=False))
    routedlora.inject(m, recipe_config("poly", n_tasks=2, target_modules=["q_proj"], n_skills=2, r=2))
    with pytest.raises(ValueError, match="train_tasks"):
        MultiTaskTrainer(m, data(), TrainConfig(progress=False))  # 3 tasks, 2 routing rows
    with pytest.raises(TypeError, match="config"):
        MultiTaskTrainer(m, data(), {"steps": 3})
    with pytest.raises(ValueError, match="parallel"):
        MultiTaskTrainer(m, {"copy": data()["copy"]}, TrainConfig(parallel="ddp", progress=False))
    with pytest.raises(ValueError, match="recipe"):
        apply_recipe(m, "nope", n_tasks=2)


def test_cli_help_and_error():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "routedlora.training", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--recipe" in out.stdout and "torchrun" in out.stdout
    from routedlora.training.cli import main

    assert main(["--tasks", "copy,nope", "--steps", "1", "--no-progress"]) == 2


class _Payload:
    """A pickle that would run code when unpickled (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_executes_code_from_a_checkpoint(tmp_path):
    trainer = make(steps=2, save_every=2, output_dir=str(tmp_path / "run"))
    trainer.train()
    ckpt = tmp_path / "run" / "step_2"
    state_file = ckpt / "trainer_state.rank0.pt"
    marker = tmp_path / "pwned"
    state = torch.load(state_file, weights_only=True)
    state["history"] = _Payload(str(marker))
    torch.save(state, state_file)
    fresh = make(steps=4, output_dir=str(tmp_path / "other"))
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match="trainer_state.rank0.pt"):
        fresh.train(resume_from=str(ckpt))
    assert not marker.exists()
    after = fresh.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded before the refusal
