"""mttl's Poly / MHR routing and layer (the MHR paper's code), restated in plain torch for tests.

Peer: microsoft/mttl, commit ce4ca51dbca73be656feb9b3e5233633e3c5dec7 (2023-08-01), file
``mttl/models/poly.py`` — the revision PEFT's Poly cites (``peft/tuners/poly/router.py``: "a simplified
implementation of …/mttl/blob/ce4ca51…/mttl/models/poly.py#L138"); options and defaults in
``mttl/config.py`` of the same commit. What this file restates, and where mttl says it:

* ``PolytroponSelector.forward``: the logits of each example's task, ``module_logits[task_ids]``
  viewed ``(bs, n_splits, n_skills)`` (the table is ``(n_tasks, n_splits·n_skills)``), then
  - ``module_logits_l2_norm``: ``F.normalize(z, p=2, dim=-1)`` is the weight, and nothing below applies;
  - otherwise ``q`` is, in this order of precedence: in training with
    ``module_logits_relaxed_bernoulli`` (mttl's default), ``RelaxedBernoulli(temperature=1, logits=z)
    .rsample()``; with ``module_logits_straight_through``, ``σ(z)`` plus the detached difference to
    ``round(σ(z))`` (forward rounded, backward ``σ``'s gradient; in training and evaluation alike);
    else ``σ(z)``. The constructor refuses relaxed Bernoulli together with straight-through;
  - ``module_logits_dropout > 0``: ``nn.Dropout(p)(q)``, a module built inside ``forward`` and so
    always in training mode (it drops in evaluation too);
  - ``poly_use_shared_skill``: the last skill's ``q`` becomes ``q·0 + 1``;
  - ``poly_average_correction``: ``w = q · √n_splits / √n_skills``; else ``w = q / (Σq + 1e-12)``.
* ``PrivateSelector.forward``: ``F.one_hot(task_ids, num_classes=n_skills).unsqueeze(1)``, one head
  that ``PolyLoRALinear``'s einsum broadcasts over every split: task ``t`` uses skill ``t`` alone.
* ``PolyLoRALinear.forward``: ``A = einsum("bqs,qsdr->bqdr", w, lora_a)`` reshaped ``(bs, d, r)``,
  ``B = einsum("bqs,qsrd->bqrd", w, lora_b)`` transposed and reshaped ``(bs, r, o)``, output
  ``F.linear(x, W, b) + x.bmm(A).bmm(B) / rank`` (the weights cast to the input's dtype).
* ``modify_with_poly._extract_identifier``: which layers share one selector (``poly_granularity``,
  renamed ``router_granularity`` in commit 1cf520dcafd1819fc5aed5dfb66c8d7f2bc88b28,
  ``mttl/models/modifiers/routing.py``): ``finegrained`` the layer's own name, ``coarsegrained`` ``""``
  (one for the model), ``blockwise`` / ``layerwise`` / ``coderwise`` the name cut after the component
  following the first ``"block."`` / ``"layer."`` / ``"coder."`` (``encoder.block.0.layer.0.SelfAttention.q``
  → ``encoder.block.0``). One selector object per identifier, so every layer of a group reads the same
  ``module_logits`` Parameter; each layer calls it itself, drawing its own noise and dropout.

Marked *not mttl*: the straight-through rounding of the relaxed Bernoulli sample (routedlora's
``router_straight_through`` with ``gumbel=True``; mttl refuses the pair).
"""
import math

import torch
import torch.nn.functional as F
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12  # mttl's normaliser epsilon


def selector_weights(module_logits, task_ids, n_splits, n_skills, *, training, relaxed_bernoulli=True,
                     straight_through=False, l2_norm=False, dropout=0.0, shared_skill=False,
                     average_correction=False, straight_through_relaxed=False):
    """``PolytroponSelector.forward``: weights ``(bs, n_splits, n_skills)`` of each example's task.

    ``straight_through_relaxed`` (*not mttl*): round the relaxed Bernoulli sample straight-through.
    """
    if relaxed_bernoulli and straight_through:
        raise ValueError("Cannot use both relaxed and straight through.")  # mttl's constructor
    z = module_logits[task_ids].view(-1, n_splits, n_skills)
    if l2_norm:
        return F.normalize(z, p=2, dim=-1)
    if training and (relaxed_bernoulli or straight_through_relaxed):
        q = RelaxedBernoulli(temperature=1.0, logits=z).rsample()
        if straight_through_relaxed:
            q = q + (torch.round(q) - q).detach()
    elif straight_through:
        q = torch.sigmoid(z)
        q = q + (torch.round(q) - q).detach()
    else:
        q = torch.sigmoid(z)
    if dropout > 0.0:
        q = torch.nn.Dropout(dropout)(q)  # a fresh module: training mode, whatever the selector's
    if shared_skill:
        q = torch.cat((q[:, :, :-1], q[:, :, -1:] * 0.0 + 1.0), dim=-1)
    if average_correction:
        return q * (math.sqrt(n_splits) / math.sqrt(n_skills))
    return q / (q.sum(dim=-1, keepdim=True) + EPS)


def private_weights(task_ids, n_skills):
    """``PrivateSelector.forward``: ``(bs, 1, n_skills)`` one-hot of each example's task (int64, as mttl)."""
    return F.one_hot(task_ids, num_classes=n_skills).unsqueeze(1)


def poly_lora_forward(x, weight, bias, lora_a, lora_b, mixing_weights, rank):
    """``PolyLoRALinear.forward`` for ``x (bs, S, d)``: base linear plus the mixed adapter, ``/ rank``."""
    w = mixing_weights.to(dtype=x.dtype)
    bs = w.shape[0]
    d, o = lora_a.shape[0] * lora_a.shape[2], lora_b.shape[0] * lora_b.shape[3]
    A = torch.einsum("bqs,qsdr->bqdr", w, lora_a).reshape(bs, d, rank)
    B = torch.einsum("bqs,qsrd->bqrd", w, lora_b).transpose(1, 2).reshape(bs, rank, o)
    return F.linear(x, weight, bias) + x.bmm(A).bmm(B) / rank


def extract_identifier(name, granularity):
    """``modify_with_poly._extract_identifier``: the key of the selector a layer named ``name`` uses."""
    pattern = {"coarsegrained": None, "finegrained": None, "layerwise": "layer", "blockwise": "block",
               "coderwise": "coder"}
    assert granularity in pattern
    if granularity == "finegrained":
        return name
    if granularity == "coarsegrained":
        return ""
    key = pattern[granularity]
    left = name.find(f"{key}.") + len(key) + 1
    right = name[left:].find(".")
    return name[:left + right]
