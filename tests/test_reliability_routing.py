"""Routing state is per thread and per asyncio task, and nothing is left behind when a block ends."""
import asyncio
import threading

import pytest
import torch
from torch import nn

import routedlora


def _model(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    cfg = dict(target_modules=["0", "2"], n_tasks=4, n_skills=3, r=2, init_weights=False)
    cfg.update(kw)
    routedlora.inject(model, routedlora.RoutedLoraConfig(**cfg))
    return model.eval()


def _run_threads(worker, tasks):
    threads = [threading.Thread(target=worker, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _reference(model, x):
    with torch.no_grad():
        out = {}
        for t in range(4):
            with routedlora.routing(model, t):
                out[t] = model(x)
        return out


def test_threads_never_see_each_others_tasks():
    model = _model()
    x = torch.randn(2, 3, 16)
    ref = _reference(model, x)
    wrong, errors = [], []
    barrier = threading.Barrier(2)

    def worker(task):
        try:
            barrier.wait()
            for _ in range(150):
                with torch.no_grad(), routedlora.routing(model, task):
                    out = model(x)
                if not torch.equal(out, ref[task]):
                    wrong.append(task)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    _run_threads(worker, (1, 3))
    assert not errors and not wrong
    with pytest.raises(ValueError, match="no task ids"):
        model(x)  # nothing is left behind once every block has ended


def test_a_block_in_another_thread_is_invisible_here():
    model = _model()
    x = torch.randn(2, 3, 16)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with routedlora.routing(model, 2):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ValueError, match="no task ids"):
            model(x)
        with torch.no_grad(), routedlora.routing(model, 1):
            torch.testing.assert_close(model(x), _reference(model, x)[1], rtol=0, atol=0)
    finally:
        release.set()
        t.join()


def test_asyncio_tasks_route_independently():
    model = _model()
    x = torch.randn(2, 3, 16)
    ref = _reference(model, x)

    async def request(task, results):
        for _ in range(20):
            # (grad mode is per thread, not per task: no torch.no_grad() across an await)
            with routedlora.routing(model, task):
                await asyncio.sleep(0)  # the other requests enter their blocks here
                with torch.no_grad():
                    results.append(torch.equal(model(x), ref[task]))

    async def main():
        results = []
        await asyncio.gather(*(request(t, results) for t in (0, 2, 3)))
        return results

    results = asyncio.run(main())
    assert len(results) == 60 and all(results)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="no task ids"):
        model(x)


def test_generate_outside_a_block_is_the_models_own():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj"], n_tasks=2, init_weights=False))
    ids = torch.randint(3, 32, (2, 4))
    with routedlora.routing(model, [0, 1]):
        model.generate(ids, max_new_tokens=2, do_sample=False, num_beams=2)
    # the block's beam expansion and decode mode left nothing behind: outside a block the layers refuse
    with pytest.raises(ValueError, match="no task ids"):
        model.generate(ids, max_new_tokens=1, do_sample=False)


def test_compiled_model_in_threads():
    model = _model()
    x = torch.randn(2, 3, 16)
    ref = _reference(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), routedlora.routing(model, 0):
        torch.testing.assert_close(compiled(x), ref[0])
    wrong = []

    def worker(task):
        for _ in range(20):
            with torch.no_grad(), routedlora.routing(model, task):
                out = compiled(x)
            if not torch.allclose(out, ref[task]):
                wrong.append(task)

    _run_threads(worker, (1, 2))
    assert not wrong


def test_compiled_model_refuses_interleaved_asyncio_blocks():
    # eager reads the ContextVar; compiled code can only read the per-thread mirror, which
    # cannot tell two tasks of one thread apart: it must refuse rather than pick one
    model = _model()
    x = torch.randn(2, 3, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    async def request(task, entered, go):
        with routedlora.routing(model, task):
            entered.set()
            await go.wait()
            with torch.no_grad():
                return compiled(x)

    async def main():
        e1, e2, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.ensure_future(request(0, e1, go))
        t2 = asyncio.ensure_future(request(1, e2, go))
        await e1.wait()
        await e2.wait()
        go.set()
        return await asyncio.gather(t1, t2, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, Exception) and "asyncio tasks" in str(r) for r in results)
    with torch.no_grad(), routedlora.routing(model, 1):  # once they are over, compiled routing works again
        torch.testing.assert_close(compiled(x), _reference(model, x)[1])
