"""Hugging Face Trainer drives an injected model as is: route each batch in compute_loss; the example runs."""
import pytest
import torch

import routedlora
from routedlora.training import CharTokenizer, collate, recipe_config, synthetic_tasks
from routedlora.training.models import default_targets, tiny_llama




def test_hf_trainer_trains_routed_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Routed(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            task_ids = inputs.pop("task_ids")
            with routedlora.routing(self.accelerator.unwrap_model(model), task_ids):
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    tok = CharTokenizer()
    model = tiny_llama(tok.vocab_size, hidden=16, layers=1)
    routedlora.inject(model, recipe_config("poly", n_tasks=2, target_modules=default_targets(model), r=2))
    data = synthetic_tasks(["copy", "reverse"], 8, length=4)
    rows = [dict(ex, task_ids=t) for t, name in enumerate(data) for ex in data[name]]

    def collator(batch):
        out = collate(batch, pad_id=0)
        out["task_ids"] = torch.tensor([b["task_ids"] for b in batch])
        return out

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, remove_unused_columns=False, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True)
    Routed(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    changed = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if not torch.equal(p, before[n])})
    assert changed == ["lora_A", "lora_B", "router_logits"]  # the base stayed frozen


def test_example_runs_with_matched_budget():
    from routedlora.training.example import run

    n = torch.get_num_threads()
    try:
        res = run(["--steps", "3", "--tasks", "copy,reverse", "--train-size", "16", "--eval-size", "8",
                   "--threads", "1", "--no-progress", "--log-every", "0"], "mta", log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    (routed, r), (lora, s) = res.items()
    assert r["trainable_params"] <= s["trainable_params"] < 1.1 * r["trainable_params"]
    assert set(r["eval"]) == {"copy", "reverse"}
