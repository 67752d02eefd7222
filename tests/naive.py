"""Independent plain-PyTorch statement of DESIGN.md §1, for tests only.

It materialises one adapter per token on purpose: slow and obvious, so that
it shares no code and no trick with the library it checks.
"""
import torch


def dense_rows(idx, w, n_skills):
    R, h, K = idx.shape
    out = torch.zeros(R, h, n_skills, dtype=w.dtype)
    for j in range(K):
        out = out + torch.nn.functional.one_hot(idx[..., j], n_skills).to(w.dtype) * w[..., j:j + 1]
    return out


def naive_delta(x, A, B, idx, w, route_ids, scale, combine):
    """Per-token adapters: params -> x Â B̂ (heads concatenated); outputs -> Σ_j w_j x A_j B_j."""
    h, m, dh, r = A.shape
    W = dense_rows(idx, w.to(x.dtype), m)[route_ids]  # (N, h, m)
    rows = []
    for n in range(x.shape[0]):
        if combine == "params":
            A_hat = torch.cat([sum(W[n, q, s] * A[q, s] for s in range(m)) for q in range(h)], dim=0)  # (d, r)
            B_hat = torch.cat([sum(W[n, q, s] * B[q, s] for s in range(m)) for q in range(h)], dim=1)  # (r, o)
            rows.append(x[n] @ A_hat @ B_hat)
        else:
            assert h == 1
            rows.append(sum(W[n, 0, s] * (x[n] @ A[0, s] @ B[0, s]) for s in range(m)))
    if not rows:
        return x.new_zeros(0, h * B.shape[-1])
    return scale * torch.stack(rows)
