"""Triton kernels of the routers (poly with Gumbel-sigmoid noise, softmax, top-k).

One program per (routing row, head) reads the row's task logits straight from the
``(T, h, m)`` table, draws the row's noise from a seed (Philox, keyed by example,
head and skill, so it is regenerated in backward and never stored), and writes the
sparse ``(idx, w)`` rows. The backward kernel recomputes the same quantities and
writes per-row logit gradients; the caller sums them per task deterministically.
"""
import triton
import triton.language as tl

POLY = tl.constexpr(0)
SOFTMAX = tl.constexpr(1)
TOPK = tl.constexpr(2)


@triton.jit
def _uniform(SEED, ex, q, ss, H, M, eps):
    # the (example, head, skill) stream of the draw; clamped like torch's clamp_probs
    seed = tl.load(SEED)
    u = tl.rand(seed, ((ex * H + q) * M + ss).to(tl.int32))
    return tl.minimum(tl.maximum(u, eps), 1.0 - eps)


@triton.jit
def _poly_probs(z, SEED, ex, q, ss, H, M, inv_tau, eps, tiny, NOISE: tl.constexpr):
    s = tl.sigmoid(z)
    if NOISE:
        pi = tl.minimum(tl.maximum(s, eps), 1.0 - eps)
        u = _uniform(SEED, ex, q, ss, H, M, eps)
        zz = (tl.log(pi) - tl.log(1.0 - pi) + tl.log(u) - tl.log(1.0 - u)) * inv_tau
        p = tl.minimum(tl.maximum(tl.sigmoid(zz), tiny), 1.0 - eps)
    else:
        p = s
    return p


@triton.jit
def _row_logits(LOGITS, ROWS_TASK, T, r, q, ss, smask, sl_t, sl_q, sl_s):
    # routing row r reads its task's logits straight from the (T, h, m) table; a task id out of
    # range is never used as an address (task 0 is read instead) and comes back not ok
    t = tl.load(ROWS_TASK + r)
    ok = (t >= 0) & (t < T)
    z = tl.load(LOGITS + tl.where(ok, t, 0) * sl_t + q * sl_q + ss * sl_s, mask=smask, other=0.0).to(tl.float32)
    return z, ok


@triton.jit
def _row_poly_probs(z, SEED, ROW_EX, r, ex_offset, q, ss, smask, H, M, inv_tau, eps, tiny, NOISE: tl.constexpr,
                    ROW_IS_EXAMPLE: tl.constexpr):
    if ROW_IS_EXAMPLE:  # one row per example: no table to read
        ex = r + ex_offset
    else:
        ex = tl.load(ROW_EX + r) + ex_offset
    return tl.where(smask, _poly_probs(z, SEED, ex, q, ss, H, M, inv_tau, eps, tiny, NOISE), 0.0)


@triton.jit
def _router_forward_kernel(LOGITS, ROWS_TASK, ROW_EX, SEED, IDX, W, T, H, M, K, ex_offset, inv_tau, eps, tiny,
                           sl_t, sl_q, sl_s, so_r, so_q, so_k,
                           KIND: tl.constexpr, NOISE: tl.constexpr, RENORM: tl.constexpr, BLOCK_M: tl.constexpr,
                           ROW_IS_EXAMPLE: tl.constexpr):
    r = tl.program_id(0)
    q = tl.program_id(1)
    ss = tl.arange(0, BLOCK_M)
    smask = ss < M
    z, ok = _row_logits(LOGITS, ROWS_TASK, T, r, q, ss, smask, sl_t, sl_q, sl_s)
    out = r * so_r + q * so_q
    if KIND == POLY:
        p = _row_poly_probs(z, SEED, ROW_EX, r, ex_offset, q, ss, smask, H, M, inv_tau, eps, tiny, NOISE,
                            ROW_IS_EXAMPLE)
        w = p / (tl.sum(p, axis=0) + 1e-12)
        tl.store(W + out + ss * so_k, tl.where(ok, w, float("nan")), mask=smask)
        tl.store(IDX + out + ss * so_k, ss.to(tl.int64), mask=smask)
    else:
        zt = tl.where(smask, z * inv_tau, float("-inf"))
        e = tl.exp(zt - tl.max(zt, axis=0))
        p = e / tl.sum(e, axis=0)
        if KIND == SOFTMAX:
            tl.store(W + out + ss * so_k, tl.where(ok, p, float("nan")), mask=smask)
            tl.store(IDX + out + ss * so_k, ss.to(tl.int64), mask=smask)
        else:
            work = tl.where(smask, p, -1.0)
            total = 0.0
            for j in range(K):
                best = tl.argmax(work, axis=0)
                total += tl.max(work, axis=0)
                work = tl.where(ss == best, -2.0, work)
            work = tl.where(smask, p, -1.0)
            for j in range(K):
                best = tl.argmax(work, axis=0)
                val = tl.max(work, axis=0)
                if RENORM:
                    val = val / total
                tl.store(W + out + j * so_k, tl.where(ok, val, float("nan")))
                tl.store(IDX + out + j * so_k, best.to(tl.int64))
                work = tl.where(ss == best, -2.0, work)


@triton.jit
def _router_backward_kernel(LOGITS, ROWS_TASK, ROW_EX, SEED, IDX, W, DW, DZ, T, H, M, K, ex_offset, inv_tau, eps, tiny,
                            sl_t, sl_q, sl_s, so_r, so_q, so_k, sd_r, sd_q,
                            KIND: tl.constexpr, NOISE: tl.constexpr, RENORM: tl.constexpr, BLOCK_M: tl.constexpr,
                           ROW_IS_EXAMPLE: tl.constexpr):
    r = tl.program_id(0)
    q = tl.program_id(1)
    ss = tl.arange(0, BLOCK_M)
    smask = ss < M
    z, ok = _row_logits(LOGITS, ROWS_TASK, T, r, q, ss, smask, sl_t, sl_q, sl_s)
    out = r * so_r + q * so_q
    if KIND == POLY:
        p = _row_poly_probs(z, SEED, ROW_EX, r, ex_offset, q, ss, smask, H, M, inv_tau, eps, tiny, NOISE,
                            ROW_IS_EXAMPLE)
        S = tl.sum(p, axis=0) + 1e-12
        dw = tl.load(DW + out + ss * so_k, mask=smask, other=0.0).to(tl.float32)
        dp = dw / S - tl.sum(dw * p, axis=0) / (S * S)
        if NOISE:
            s = tl.sigmoid(z)
            # logit(clamp(sigmoid(z))) has slope 1 inside the clamp, 0 outside
            inside = (s >= eps) & (s <= 1.0 - eps)
            p_in = (p > tiny) & (p < 1.0 - eps)
            dz = tl.where(p_in, dp * p * (1.0 - p), 0.0) * inv_tau
            dz = tl.where(inside, dz, 0.0)
        else:
            dz = dp * p * (1.0 - p)
    else:
        zt = tl.where(smask, z * inv_tau, float("-inf"))
        e = tl.exp(zt - tl.max(zt, axis=0))
        p = e / tl.sum(e, axis=0)
        if KIND == SOFTMAX:
            dp = tl.load(DW + out + ss * so_k, mask=smask, other=0.0).to(tl.float32)
        else:
            dp = tl.zeros((BLOCK_M,), dtype=tl.float32)
            total = 0.0
            for j in range(K):
                total += tl.sum(tl.where(ss == tl.load(IDX + out + j * so_k), p, 0.0), axis=0)
            for j in range(K):
                sel = ss == tl.load(IDX + out + j * so_k)
                g = tl.load(DW + out + j * so_k).to(tl.float32)
                dp += tl.where(sel, g, 0.0)
            if RENORM:
                # w_j = p_j / total over the kept set: dp_j = (g_j - Σ_i g_i w_i) / total
                kept = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for j in range(K):
                    kept += tl.where(ss == tl.load(IDX + out + j * so_k), 1.0, 0.0)
                gw = tl.sum(dp * p * kept, axis=0) / total
                dp = tl.where(kept > 0, (dp - gw) / total, 0.0)
        dz = inv_tau * p * (dp - tl.sum(dp * p, axis=0))
    tl.store(DZ + r * sd_r + q * sd_q + ss, dz, mask=smask)


@triton.jit
def _uniform_kernel(SEED, OUT, H, M, eps, BLOCK_M: tl.constexpr):
    ex = tl.program_id(0)
    q = tl.program_id(1)
    ss = tl.arange(0, BLOCK_M)
    u = _uniform(SEED, ex, q, ss, H, M, eps)
    tl.store(OUT + (ex * H + q) * M + ss, u, mask=ss < M)
