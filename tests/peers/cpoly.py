"""C-Poly's router and layer (PEFT pull request #1297, "Add cpoly"), restated in plain torch for tests.

Peer: huggingface/peft pull request #1297 (closed, not merged), its branch as stored at
TaoSunVoyage/peft, commit fde7b653a98e31e3ce397db6cac71cb3d9437a58: ``src/peft/tuners/poly/router.py``
(``PolyRouter``, ``CPolyRouter``, ``CPolySimpleRouter``), ``src/peft/tuners/poly/layer.py``
(``PolyLayer.update_layer``, ``Linear.forward``) and ``src/peft/tuners/poly/config.py``
(``poly_type: "poly" | "cpoly" | "cpoly_simple"``). What this file restates:

* skills: ``n_skills + n_tasks`` per split for the ``cpoly`` types (one task-private skill per task,
  after the common ones), ``poly_lora_A (n_splits, total, in/n_splits, r)``, ``poly_lora_B`` likewise;
* ``PolyRouter.forward`` (the common skills): ``module_logits[task_ids]`` (table ``(n_tasks,
  n_splits·n_skills)``, initialised ``U(±1e-3)``) viewed ``(bs, n_splits, n_skills)``; in training
  ``RelaxedBernoulli(temperature=1, logits=z).rsample()``, else ``σ(z)``; then ``w / (Σw + 1e-12)``;
* ``CPolyRouter``: a second table ``c_module_logits (n_tasks, n_tasks)``, initialised to the identity
  (``torch.nn.init.eye_``), trained; its row of the example's task, unnormalised, is the weight of the
  task-private skills in *every* split (one weight per private skill, tied across heads), concatenated
  after the common weights;
* ``CPolySimpleRouter``: the same with ``F.one_hot(task_ids, n_tasks)`` in place of the table — fixed,
  no parameter, never trained;
* ``Linear.forward``: as PEFT Poly, ``A = einsum("bqs,qsdr->bqdr", w, A)`` reshaped ``(bs, d, r)``,
  ``B = einsum("bqs,qsrd->bqrd", w, B)`` transposed and reshaped ``(bs, r, o)``,
  ``result + x.bmm(A).bmm(B) / r``.

One correction: the PR broadcasts the task-specific row over the splits with
``.unsqueeze(1).expand((1, n_splits, 1))``, which torch accepts only for one example and one task
(``expand`` cannot turn a size ``bs`` or ``n_tasks`` into 1); the intended broadcast,
``expand(-1, n_splits, -1)``, is what is restated here. Generalisation (*not the PR*):
``n_specific`` private skills per task, task ``t`` owning skills ``t·n_specific … (t+1)·n_specific − 1``
(the PR has ``n_specific = 1``).
"""
import torch
import torch.nn.functional as F
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12


def poly_router(module_logits, task_ids, n_splits, n_skills, *, training):
    """``PolyRouter.forward``: normalised common-skill weights ``(bs, n_splits, n_skills)``."""
    z = module_logits[task_ids].view(-1, n_splits, n_skills)
    q = RelaxedBernoulli(temperature=1.0, logits=z).rsample() if training else torch.sigmoid(z)
    return q / (q.sum(dim=-1, keepdim=True) + EPS)


def specific_owner(n_tasks, n_specific=1):
    """``(n_tasks, n_tasks·n_specific)``: 1 where task ``t`` owns the private skill (the identity for one)."""
    return torch.arange(n_tasks * n_specific)[None, :] // n_specific == torch.arange(n_tasks)[:, None]


def cpoly_router(module_logits, c_module_logits, task_ids, n_splits, n_skills, *, training, simple=False,
                 n_specific=1):
    """``CPolyRouter.forward`` (``simple``: ``CPolySimpleRouter.forward``): ``(bs, n_splits, n_skills + T·n_specific)``.

    ``c_module_logits``: ``(n_tasks, n_tasks·n_specific)``, unused when ``simple``.
    """
    w = poly_router(module_logits, task_ids, n_splits, n_skills, training=training)
    if simple:
        n_tasks = module_logits.shape[0]
        # the PR: F.one_hot(task_ids, n_tasks); with several private skills per task, their owner pattern
        c = F.one_hot(task_ids, num_classes=n_tasks) if n_specific == 1 else specific_owner(n_tasks, n_specific)[task_ids]
    else:
        c = c_module_logits[task_ids]
    c = c.unsqueeze(1).expand(-1, n_splits, -1)
    return torch.cat((w, c), dim=-1)


def cpoly_lora_forward(x, weight, bias, lora_a, lora_b, mixing_weights, r):
    """``Linear.forward`` for ``x (bs, S, d)``: ``x Wᵀ + b + x Â B̂ / r`` per example."""
    w = mixing_weights
    bs = w.shape[0]
    d, o = lora_a.shape[0] * lora_a.shape[2], lora_b.shape[0] * lora_b.shape[3]
    A = torch.einsum("bqs,qsdr->bqdr", w, lora_a).reshape(bs, d, r)
    B = torch.einsum("bqs,qsrd->bqrd", w, lora_b).transpose(1, 2).reshape(bs, r, o)
    return F.linear(x, weight, bias) + x.to(A.dtype).bmm(A).bmm(B) / r

