"""Triton kernels of the routed LoRA op (installed as ``routedlora.triton_kernels.routed_lora``).

Tokens are visited in routing-row order (a stable sort of ``route_ids`` done on the
device), so a tile of tokens shares one routing row or straddles a few. A tile walks
its row *segments*: for each one it mixes the row's skills in registers (``params``
combine) or applies them one by one (``outputs`` combine), masked to the segment's
tokens. No tile is padded per group and no adapter is written to device memory.

Five kernels serve forward and backward:

* ``_shrink_kernel``   x-side products with the skills' ``(dh, r)`` matrices, MODE
                       0: mixed and summed over heads -> ``(N, r)``; 1: one result
                       per slot -> ``(N, K, r)``; 2: per head and slot, dotted with a
                       per-token rank vector -> ``(N, h, K)`` (routing gradients).
* ``_expand_kernel``   rank space back to features, ``(N, r) or (N, K, r)`` times
                       the skills' ``(r, oh)`` matrices, optionally added to a base.
* ``_weight_grad_kernel``  ``Σ_n wide[n]ᵀ ⊗ (coefficient · rank vector)[n]`` per
                       (head, skill, column block): the skills' gradients, one
                       program per output block, no atomics (deterministic).
* ``_segment_sum_kernel``  per-token routing gradients summed per routing row.

The same shrink/expand kernels run transposed views of the skills in backward
(``Bᵀ`` to pull gradients into rank space, ``Aᵀ`` to go back to ``x``).
"""
import triton
import triton.language as tl

# Padding value for the rows of out-of-range tile slots: larger than any row id.
ROW_PAD = tl.constexpr(2**62)


@triton.jit
def _next_row(rows, row):
    return tl.min(tl.where(rows > row, rows, ROW_PAD), axis=0)


@triton.jit
def _shrink_kernel(X, M, IDX, WGT, ORDER, SROWS, OUT, V,
                   N, DH, RANK, K,
                   sx_n, sx_d, sm_q, sm_s, sm_d, sm_r, si_r, si_q, si_k,
                   so_n, so_a, so_b, sv_n, sv_r,
                   H: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    tok = tl.load(ORDER + offs, mask=valid, other=0)
    rows = tl.load(SROWS + offs, mask=valid, other=ROW_PAD)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    dd = tl.arange(0, BLOCK_D)
    acc_u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if MODE == 2:
        v = tl.load(V + tok[:, None] * sv_n + rr[None, :] * sv_r, mask=valid[:, None] & rmask[None, :], other=0.0)
    row = tl.min(rows, axis=0)
    while row < ROW_PAD:
        seg = valid & (rows == row)
        for q in tl.static_range(H):
            if MODE == 0:
                for d0 in range(0, DH, BLOCK_D):
                    dmask = (d0 + dd) < DH
                    xt = tl.load(X + tok[:, None] * sx_n + (q * DH + d0 + dd)[None, :] * sx_d,
                                 mask=seg[:, None] & dmask[None, :], other=0.0)
                    mixed = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
                    for j in range(K):
                        s = tl.load(IDX + row * si_r + q * si_q + j * si_k)
                        wj = tl.load(WGT + row * si_r + q * si_q + j * si_k).to(tl.float32)
                        a = tl.load(M + q * sm_q + s * sm_s + (d0 + dd)[:, None] * sm_d + rr[None, :] * sm_r,
                                    mask=dmask[:, None] & rmask[None, :], other=0.0)
                        mixed += wj * a.to(tl.float32)
                    acc_u += tl.dot(xt, mixed.to(xt.dtype), input_precision=PREC)
            else:
                for j in range(K):
                    s = tl.load(IDX + row * si_r + q * si_q + j * si_k)
                    z = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                    for d0 in range(0, DH, BLOCK_D):
                        dmask = (d0 + dd) < DH
                        xt = tl.load(X + tok[:, None] * sx_n + (q * DH + d0 + dd)[None, :] * sx_d,
                                     mask=seg[:, None] & dmask[None, :], other=0.0)
                        a = tl.load(M + q * sm_q + s * sm_s + (d0 + dd)[:, None] * sm_d + rr[None, :] * sm_r,
                                    mask=dmask[:, None] & rmask[None, :], other=0.0)
                        z += tl.dot(xt, a, input_precision=PREC)
                    if MODE == 1:
                        tl.store(OUT + tok[:, None] * so_n + j * so_a + rr[None, :] * so_b, z,
                                 mask=seg[:, None] & rmask[None, :])
                    else:
                        p = tl.sum(z * v, axis=1)
                        tl.store(OUT + tok * so_n + q * so_a + j * so_b, p, mask=seg)
        row = _next_row(rows, row)
    if MODE == 0:
        tl.store(OUT + tok[:, None] * so_n + rr[None, :] * so_b, acc_u, mask=valid[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(U, M, IDX, WGT, ORDER, SROWS, BASE, Y,
                   N, OH, RANK, K, scale,
                   su_n, su_k, su_r, sm_q, sm_s, sm_r, sm_o, si_r, si_q, si_k, sb_n, sb_o, sy_n, sy_o,
                   MIX: tl.constexpr, HAS_BASE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    q = tl.program_id(1)
    pid_o = tl.program_id(2)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    tok = tl.load(ORDER + offs, mask=valid, other=0)
    rows = tl.load(SROWS + offs, mask=valid, other=ROW_PAD)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = oo < OH
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    row = tl.min(rows, axis=0)
    while row < ROW_PAD:
        seg = valid & (rows == row)
        if MIX:
            mixed = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
            for j in range(K):
                s = tl.load(IDX + row * si_r + q * si_q + j * si_k)
                wj = tl.load(WGT + row * si_r + q * si_q + j * si_k).to(tl.float32)
                b = tl.load(M + q * sm_q + s * sm_s + rr[:, None] * sm_r + oo[None, :] * sm_o,
                            mask=rmask[:, None] & omask[None, :], other=0.0)
                mixed += wj * b.to(tl.float32)
            u = tl.load(U + tok[:, None] * su_n + rr[None, :] * su_r, mask=seg[:, None] & rmask[None, :], other=0.0)
            acc += tl.dot(u.to(M.dtype.element_ty), mixed.to(M.dtype.element_ty), input_precision=PREC)
        else:
            for j in range(K):
                s = tl.load(IDX + row * si_r + q * si_q + j * si_k)
                wj = tl.load(WGT + row * si_r + q * si_q + j * si_k).to(tl.float32)
                b = tl.load(M + q * sm_q + s * sm_s + rr[:, None] * sm_r + oo[None, :] * sm_o,
                            mask=rmask[:, None] & omask[None, :], other=0.0)
                z = tl.load(U + tok[:, None] * su_n + j * su_k + rr[None, :] * su_r,
                            mask=seg[:, None] & rmask[None, :], other=0.0)
                acc += tl.dot((z * wj).to(b.dtype), b, input_precision=PREC)
        row = _next_row(rows, row)
    out = acc * scale
    mask = valid[:, None] & omask[None, :]
    cols = q * OH + oo
    if HAS_BASE:
        out += tl.load(BASE + tok[:, None] * sb_n + cols[None, :] * sb_o, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + tok[:, None] * sy_n + cols[None, :] * sy_o, out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(WIDE, VR, IDX, WGT, RIDS, OUT,
                        N, WIDTH, RANK, K, SKILLS, scale,
                        sw_n, sw_w, sv_n, sv_k, sv_r, si_r, si_q, si_k, so_q, so_s, so_w, so_r,
                        SHARED_V: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    q = pid // SKILLS
    s = pid % SKILLS
    ww = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = ww < WIDTH
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    acc = tl.zeros((BLOCK_W, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # token * stride can pass 2**31
        nmask = nn < N
        rows = tl.load(RIDS + nn, mask=nmask, other=0)
        wide = tl.load(WIDE + nn[:, None] * sw_n + (q * WIDTH + ww)[None, :] * sw_w,
                       mask=nmask[:, None] & wmask[None, :], other=0.0)
        rank = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        if SHARED_V:
            coef = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in range(K):
                sj = tl.load(IDX + rows * si_r + q * si_q + j * si_k, mask=nmask, other=-1)
                wj = tl.load(WGT + rows * si_r + q * si_q + j * si_k, mask=nmask, other=0.0).to(tl.float32)
                coef += tl.where(sj == s, wj, 0.0)
            v = tl.load(VR + nn[:, None] * sv_n + rr[None, :] * sv_r, mask=nmask[:, None] & rmask[None, :], other=0.0)
            rank = coef[:, None] * v
        else:
            for j in range(K):
                sj = tl.load(IDX + rows * si_r + q * si_q + j * si_k, mask=nmask, other=-1)
                wj = tl.load(WGT + rows * si_r + q * si_q + j * si_k, mask=nmask, other=0.0).to(tl.float32)
                v = tl.load(VR + nn[:, None] * sv_n + j * sv_k + rr[None, :] * sv_r,
                            mask=nmask[:, None] & rmask[None, :], other=0.0)
                rank += tl.where(sj == s, wj, 0.0)[:, None] * v
        acc += tl.dot(tl.trans(wide), rank.to(wide.dtype), input_precision=PREC)
    acc = acc * scale
    tl.store(OUT + q * so_q + s * so_s + ww[:, None] * so_w + rr[None, :] * so_r, acc.to(OUT.dtype.element_ty),
             mask=wmask[:, None] & rmask[None, :])


@triton.jit
def _segment_sum_kernel(P, ORDER, OFFS, OUT, COLS, sp_n, so_r,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(OFFS + row)
    end = tl.load(OFFS + row + 1)
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < COLS
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < end
        tok = tl.load(ORDER + tt, mask=tmask, other=0)
        p = tl.load(P + tok[:, None] * sp_n + cc[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(p, axis=0)
    tl.store(OUT + row * so_r + cc, acc, mask=cmask)
