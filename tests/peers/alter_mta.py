"""ALTER's Mixture-of-Task-Adapters (MTA) forward math, restated in plain torch for tests.

Peer: alibaba/EasyNLP, commit a4ee9568fa094f5825346f3acd0d65b15f1e3a95 (2024-11-27), ``examples/mta``
(ALTER, arXiv 2309.11042). What this file restates, and where ALTER's code says it:

* ``models/models/modeling_MTA.py``, class ``MTA_noisegate`` — the MTA module that ``MTALayers``
  builds (stage 1). One trainable vector of adapter logits per task type, initialised to 0.2 with
  0.22 on two adjacent adapters (``gate_for_classify = (0.22, 0.22, 0.2, 0.2, 0.2)``,
  ``gate_for_nli = (0.2, 0.22, 0.22, 0.2, 0.2)``, …). A sequence of task ``t`` gets
  ``Σ_e softmax(z_t / 0.1)_e · expert_e(h)`` over *every* expert: dense Softmax-T, ``temp = 0.1``.
* same file, class ``MTA_sharemoe4`` (stage 2: task adapters plus shared adapters and a gate).
  Task logits initialised the same way on four adapters (``(0.22, 0.22, 0.20, 0.20)``,
  ``(0.20, 0.22, 0.22, 0.20)``, ``(0.20, 0.20, 0.22, 0.22)``: task ``t`` prefers ``t`` and
  ``t + 1``). A sequence of task index ``t`` takes the fixed pair of experts ``t`` and ``t + 1``
  with weights ``softmax(z_t / 0.1)[t]`` and ``[t + 1]`` — picked by index, not by value, and
  not renormalised. The gate is ``Sequential(Linear(4·H, H, bias=False), ReLU, Linear(H, 4,
  bias=False), Softmax)`` with ``H = my_hidden_size`` (= ``d_model``, 768 in
  ``models/test_config/t5_base_config.json``), left at ``nn.Linear``'s random initialisation,
  one module shared by all tasks. It reads the concatenation, at the sequence's first
  position, of the task mixture and of each shared expert's output; the module's output is
  ``g_0 · task_mixture + Σ_j g_j · shared_j``.
* ``modeling_MTA.py`` (top level), ``MTAStack`` and ``Copyweight``: the MTA module replaces the
  feed-forward network of block 11 only (the last of T5's 12) in the encoder and the decoder,
  and every expert starts as a copy of that block's pretrained ``DenseReluDense``.

Experts here are any per-expert outputs the caller computes (routedlora's are LoRA deltas
``γ x A_e B_e``); the loops go sequence by sequence as ALTER's do. Generalisation: ALTER hard-codes
three or five task types and four or five experts; here task ``t``'s adjacent pair is
``(t mod m, (t + 1) mod m)`` (ALTER's ``t + 1`` has no expert for ``t = m - 1``).

Not in ALTER's code, stated in the same way for routedlora's other options (marked *not ALTER*):
the paper's top-k selection of task adapters (keep the k largest Softmax-T weights, optionally
renormalised) and routedlora's ``tanh`` gate (``Linear → Tanh → Linear`` with biases).
"""
import torch

ALTER_TEMPERATURE = 0.1  # ``temp = 0.1`` in MTA_noisegate; ``/0.1`` in MTA_sharemoe4
ALTER_LOGIT, ALTER_PREFERRED = 0.2, 0.22


def alter_task_logits(n_tasks, n_experts, dtype=torch.float32):
    """ALTER's initial task-to-adapter logits, ``(n_tasks, n_experts)``: 0.2, and 0.22 on task ``t``'s pair."""
    z = torch.full((n_tasks, n_experts), ALTER_LOGIT, dtype=dtype)
    for t in range(n_tasks):
        z[t, t % n_experts] = ALTER_PREFERRED
        z[t, (t + 1) % n_experts] = ALTER_PREFERRED
    return z


def softmax_t(z, temperature=ALTER_TEMPERATURE):
    return torch.softmax(z / temperature, dim=0)


# --- stage 1: task adapters (MTA_noisegate) -----------------------------------------------


def stage1_dense(expert_outputs, task_logits, tasks, temperature=ALTER_TEMPERATURE):
    """``expert_outputs[e]``: ``(B, S, o)``; ``task_logits``: ``(T, m)``; ``tasks``: the task of each sequence."""
    out = []
    for i, t in enumerate(tasks):
        p = softmax_t(task_logits[t], temperature)
        out.append(sum(expert_outputs[e][i] * p[e] for e in range(len(expert_outputs))))
    return torch.stack(out)


def stage1_topk(expert_outputs, task_logits, tasks, k, renormalize, temperature=ALTER_TEMPERATURE):
    """*not ALTER*: the paper's top-k selection, the k largest Softmax-T weights (renormalised or not)."""
    out = []
    for i, t in enumerate(tasks):
        p = softmax_t(task_logits[t], temperature)
        kept, which = torch.topk(p, k)
        if renormalize:
            kept = kept / kept.sum()
        out.append(sum(expert_outputs[int(e)][i] * kept[j] for j, e in enumerate(which)))
    return torch.stack(out)


# --- stage 2: fixed pair, shared adapters, gate (MTA_sharemoe4) ------------------------------


def stage2_pair_mixture(expert_outputs, task_logits, tasks, temperature=ALTER_TEMPERATURE):
    """Each sequence's task mixture: experts ``t`` and ``t + 1`` (mod m), weights as Softmax-T gives them."""
    m = len(expert_outputs)
    out = []
    for i, t in enumerate(tasks):
        p = softmax_t(task_logits[t], temperature)
        a, b = t % m, (t + 1) % m
        out.append(expert_outputs[a][i] * p[a] + expert_outputs[b][i] * p[b])
    return torch.stack(out)


def stage2_topk_mixture(expert_outputs, task_logits, tasks, k, renormalize, temperature=ALTER_TEMPERATURE):
    """*not ALTER*: the task mixture of stage 2 by the paper's top-k selection."""
    return stage1_topk(expert_outputs, task_logits, tasks, k, renormalize, temperature)


def alter_gate(w1, w2):
    """ALTER's gate: ``softmax(W2 · relu(W1 · f))``, no biases."""
    return lambda f: torch.softmax(torch.relu(f @ w1.T) @ w2.T, dim=-1)


def tanh_gate(w1, b1, w2, b2):
    """*not ALTER*: routedlora's ``tanh`` gate, ``softmax(W2 · tanh(W1 · f + b1) + b2)``."""
    return lambda f: torch.softmax(torch.tanh(f @ w1.T + b1) @ w2.T + b2, dim=-1)


def stage2(task_mixture, shared_outputs, gate):
    """``task_mixture``: ``(B, S, o)``; ``shared_outputs[j]``: ``(B, S, o)``; ``gate``: features -> weights.

    The gate reads ``[task_mixture; shared_1; …]`` at each sequence's first position; the output is
    ``g_0 · task_mixture + Σ_j g_j · shared_j`` at every position."""
    out = []
    for i in range(task_mixture.shape[0]):
        feats = torch.cat([task_mixture[i][0]] + [s[i][0] for s in shared_outputs], dim=0)
        g = gate(feats)
        out.append(task_mixture[i] * g[0] + sum(s[i] * g[j + 1] for j, s in enumerate(shared_outputs)))
    return torch.stack(out)
