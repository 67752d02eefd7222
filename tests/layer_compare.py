"""Two routed layers with equal values, run on the same batch: outputs and every gradient must agree."""
import torch


def assert_layers_agree(ref, fast, x, tasks, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5):
    y_ref, y = ref(x, task_ids=tasks), fast(x, task_ids=tasks)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=grad_rtol, atol=grad_atol, msg=name)
