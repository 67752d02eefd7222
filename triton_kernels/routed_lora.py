"""Triton kernels of the routed LoRA op (installed as ``routedlora.triton_kernels.routed_lora``).

Tokens are visited in routing-row order (a stable sort of ``route_ids`` done on the
device), so a tile of tokens shares one routing row or straddles a few. A tile walks
its row *segments*: for each one it mixes the row's skills in registers (``params``
combine) or applies them one by one (``outputs`` combine), masked to the segment's
tokens. No tile is padded per group and no adapter is written to device memory.

Six kernels serve forward and backward:

* ``_shrink_kernel``   x-side products with the skills' ``(dh, r)`` matrices, MODE
                       0: mixed and summed over heads -> ``(N, r)``; 1: one result
                       per slot -> ``(N, K, r)``; 2: every skill of a head in one
                       product, dotted with a per-token rank vector and gathered per
                       slot -> ``(N, h, K)`` (routing gradients); times ``scale``.
* ``_expand_kernel``   rank space back to features, ``(N, r) or (N, K, r)`` times
                       the skills' ``(r, oh)`` matrices, added to a base output or,
                       ``LINEAR``, to the base linear ``x Wᵀ + b`` computed in the
                       same tile (the base GEMM with the LoRA as its prologue: the
                       output is written once, no delta in memory). Its programs run
                       in groups of token tiles (``routedlora/ops/tile_order.py``), so
                       a base weight larger than L2 streams from HBM once per group.
* ``_row_reduce_kernel``  per routing row, ``x_ρᵀ dU_ρ`` and ``γ g_ρᵀ u_ρ`` (float32):
                       the backward's one pass over ``x`` and one over the gradient
                       for rows of many tokens.
* ``_mix_grads_kernel``   those per-row reductions mixed into every skill's gradient
                       (all skills of a head in one program) and dotted with the
                       skills for the routing-weight gradients.
* ``_weight_grad_kernel``  ``Σ_n wide[n]ᵀ ⊗ (coefficient · rank vector)[n]`` for a
                       block of skills at once per (head, column block, token
                       chunk): the skills' gradients token by token, for rows of
                       few tokens, with ``wide`` read once per skill block.
* ``_segment_sum_kernel``  per-token routing gradients (split-K partials of one or two
                       sources) summed per routing row.

The same shrink/expand kernels run transposed views of the skills in backward
(``Bᵀ`` to pull gradients into rank space, ``Aᵀ`` to go back to ``x``). Every
reduction runs in a fixed order inside one program: no atomics, deterministic.
"""
import triton
import triton.language as tl

# Padding value for the rows of out-of-range tile slots: larger than any row id.
ROW_PAD = tl.constexpr(2**62)


@triton.jit
def _next_row(rows, row):
    return tl.min(tl.where(rows > row, rows, ROW_PAD), axis=0)


@triton.jit
def _skill(IDX, row, q, j, si_r, si_q, si_k, ROWS, SKILLS):
    # slot j of a routing row: (skill, ok, offset). An out-of-range row or skill is never used as an
    # address (row 0 / skill 0 are read instead): the caller turns the tokens it touches into NaN
    row_ok = (row >= 0) & (row < ROWS)
    at = tl.where(row_ok, row, 0) * si_r + q * si_q + j * si_k
    s = tl.load(IDX + at)
    ok = row_ok & (s >= 0) & (s < SKILLS)
    return tl.where(ok, s, 0), ok, at


@triton.jit
def _slot(IDX, WGT, row, q, j, si_r, si_q, si_k, ROWS, SKILLS):
    # slot j of a routing row with its weight: (skill, weight, ok), as _skill
    s, ok, at = _skill(IDX, row, q, j, si_r, si_q, si_k, ROWS, SKILLS)
    return s, tl.load(WGT + at).to(tl.float32), ok


@triton.jit
def _slot_coef(IDX, WGT, rows, row_ok, nmask, ms, q, j, si_r, si_q, si_k, SKILLS):
    # per token, slot j's weight on each skill of ms (BLOCK_N, BLOCK_M); a token whose row or skill
    # is out of range gets NaN everywhere: it poisons the sums it enters
    sj = tl.load(IDX + rows * si_r + q * si_q + j * si_k, mask=nmask, other=-1)
    wj = tl.load(WGT + rows * si_r + q * si_q + j * si_k, mask=nmask, other=0.0).to(tl.float32)
    bad = nmask & ~(row_ok & (sj >= 0) & (sj < SKILLS))
    return tl.where(bad[:, None], float("nan"), tl.where(sj[:, None] == ms[None, :], wj[:, None], 0.0))


@triton.jit
def _all_skills_dot(X, M, IDX, OUT, tok, rows, valid, v, DH, RANK, K, SKILLS, ROWS, scale, lo, hi, sx_n, sx_d,
                    sm_q, sm_s, sm_d, sm_r, si_r, si_q, si_k, so_n, so_a, so_b, H: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    # OUT[n, q, j] = scale · ⟨x_q[n] M_q,s, v[n]⟩ for the skill s of slot j: every skill of the head
    # against the tile in one product (the skills side by side as BLOCK_M·BLOCK_R columns), so x is
    # read once per skill block, not once per slot; rows need no segments (each token gathers its own)
    ff = tl.arange(0, BLOCK_M * BLOCK_R)
    fk = ff % BLOCK_R
    dd = tl.arange(0, BLOCK_D)
    for q in tl.static_range(H):
        for s0 in range(0, SKILLS, BLOCK_M):
            fs = s0 + ff // BLOCK_R
            fmask = (fs < SKILLS) & (fk < RANK)
            z = tl.zeros((BLOCK_N, BLOCK_M * BLOCK_R), dtype=tl.float32)
            for d0 in range(lo * BLOCK_D, hi * BLOCK_D, BLOCK_D):  # this program's column blocks of the head
                dmask = (d0 + dd) < DH
                xt = tl.load(X + tok[:, None] * sx_n + (q * DH + d0 + dd)[None, :] * sx_d,
                             mask=valid[:, None] & dmask[None, :], other=0.0)
                a = tl.load(M + q * sm_q + fs[None, :] * sm_s + (d0 + dd)[:, None] * sm_d + fk[None, :] * sm_r,
                            mask=dmask[:, None] & fmask[None, :], other=0.0)
                z += tl.dot(xt, a, input_precision=PREC)
            p = tl.sum(tl.reshape(z, (BLOCK_N, BLOCK_M, BLOCK_R)) * v[:, None, :], axis=2) * scale
            ms = s0 + tl.arange(0, BLOCK_M)
            row_ok = (rows >= 0) & (rows < ROWS)
            for j in range(K):
                sj = tl.load(IDX + tl.where(row_ok, rows, 0) * si_r + q * si_q + j * si_k, mask=valid, other=0)
                ok = row_ok & (sj >= 0) & (sj < SKILLS)
                pj = tl.sum(tl.where(ms[None, :] == sj[:, None], p, 0.0), axis=1)
                hit = valid & ok & (sj >= s0) & (sj < s0 + BLOCK_M)
                tl.store(OUT + tok * so_n + q * so_a + j * so_b, tl.where(ok, pj, float("nan")),
                         mask=hit | (valid & ~ok))


@triton.jit
def _segment_shrink(X, M, IDX, WGT, OUT, tok, rows, valid, rr, rmask, DH, K, SKILLS, ROWS, scale, lo, hi, sx_n, sx_d,
                    sm_q, sm_s,
                    sm_d, sm_r, si_r, si_q, si_k, so_n, so_a, so_b, MODE: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # modes 0 and 1: the tile's routing-row segments one by one, each row's skills mixed (0) or
    # applied slot by slot (1), over this program's steps [lo, hi) of the (head, column block) walk
    dd = tl.arange(0, BLOCK_D)
    nd = tl.cdiv(DH, BLOCK_D)
    acc_u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    poison = tl.zeros((BLOCK_N,), dtype=tl.int32)  # tokens whose row or skill is out of range
    row = tl.min(rows, axis=0)
    while row < ROW_PAD:
        seg = valid & (rows == row)
        if MODE == 0:
            for step in range(lo, hi):
                q = step // nd
                d0 = (step % nd) * BLOCK_D
                dmask = (d0 + dd) < DH
                xt = tl.load(X + tok[:, None] * sx_n + (q * DH + d0 + dd)[None, :] * sx_d,
                             mask=seg[:, None] & dmask[None, :], other=0.0)
                mixed = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
                for j in range(K):
                    s, wj, ok = _slot(IDX, WGT, row, q, j, si_r, si_q, si_k, ROWS, SKILLS)
                    poison = tl.where(seg & ~ok, 1, poison)
                    a = tl.load(M + q * sm_q + s * sm_s + (d0 + dd)[:, None] * sm_d + rr[None, :] * sm_r,
                                mask=dmask[:, None] & rmask[None, :], other=0.0)
                    mixed += wj * a.to(tl.float32)
                acc_u += tl.dot(xt, mixed.to(xt.dtype), input_precision=PREC)
        else:  # one head
            for j in range(K):
                s, ok, _ = _skill(IDX, row, 0, j, si_r, 0, si_k, ROWS, SKILLS)  # not ok: the slot's result is NaN
                z = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                for step in range(lo, hi):
                    d0 = step * BLOCK_D
                    dmask = (d0 + dd) < DH
                    xt = tl.load(X + tok[:, None] * sx_n + (d0 + dd)[None, :] * sx_d,
                                 mask=seg[:, None] & dmask[None, :], other=0.0)
                    a = tl.load(M + s * sm_s + (d0 + dd)[:, None] * sm_d + rr[None, :] * sm_r,
                                mask=dmask[:, None] & rmask[None, :], other=0.0)
                    z += tl.dot(xt, a, input_precision=PREC)
                tl.store(OUT + tok[:, None] * so_n + j * so_a + rr[None, :] * so_b,
                         tl.where(ok, z * scale, float("nan")), mask=seg[:, None] & rmask[None, :])
        row = _next_row(rows, row)
    if MODE == 0:
        tl.store(OUT + tok[:, None] * so_n + rr[None, :] * so_b,
                 tl.where(poison[:, None] != 0, float("nan"), acc_u * scale), mask=valid[:, None] & rmask[None, :])


@triton.jit
def _shrink_kernel(X, M, IDX, WGT, ORDER, SROWS, OUT, V,
                   N, ROWS, DH, RANK, K, SKILLS, STEPS, scale,
                   sx_n, sx_d, sm_q, sm_s, sm_d, sm_r, si_r, si_q, si_k,
                   so_p, so_n, so_a, so_b, sv_n, sv_r,
                   H: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    tok = tl.load(ORDER + offs, mask=valid, other=0)
    rows = tl.load(SROWS + offs, mask=valid, other=ROW_PAD)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    # split-K: program (tile, p) walks steps [p·STEPS, (p+1)·STEPS) of the column blocks (of each
    # head in MODE 2, of the (head, column block) walk otherwise) and writes partial p, summed in
    # order by the consumer (no atomics)
    part = tl.program_id(1)
    lo = part * STEPS
    if MODE == 2:
        hi = tl.minimum(lo + STEPS, tl.cdiv(DH, BLOCK_D))
        v = tl.load(V + tok[:, None] * sv_n + rr[None, :] * sv_r, mask=valid[:, None] & rmask[None, :], other=0.0)
        _all_skills_dot(X, M, IDX, OUT + part.to(tl.int64) * so_p, tok, rows, valid, v, DH, RANK, K, SKILLS, ROWS,
                        scale,
                        lo, hi, sx_n, sx_d, sm_q, sm_s, sm_d, sm_r, si_r, si_q, si_k, so_n, so_a, so_b, H, PREC,
                        BLOCK_N, BLOCK_D, BLOCK_R, BLOCK_M)
    else:
        hi = tl.minimum(lo + STEPS, H * tl.cdiv(DH, BLOCK_D))
        _segment_shrink(X, M, IDX, WGT, OUT + part.to(tl.int64) * so_p, tok, rows, valid, rr, rmask, DH, K, SKILLS,
                        ROWS, scale,
                        lo, hi, sx_n, sx_d, sm_q, sm_s, sm_d, sm_r, si_r, si_q, si_k, so_n, so_a, so_b, MODE, PREC,
                        BLOCK_N, BLOCK_D, BLOCK_R)


@triton.jit
def _sum_parts(ptrs, mask, SPLITS, su_p, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # the split-K shrink's partials of one (tokens x rank) tile, summed in split order
    u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for p in range(SPLITS):
        u += tl.load(ptrs + p * su_p, mask=mask, other=0.0)
    return u


@triton.jit
def _expand_kernel(U, M, IDX, WGT, ORDER, SROWS, BASE, Y, X, WT, BIAS, UOUT,
                   N, ROWS, SKILLS, OH, RANK, K, HEADS, DIN, SPLITS, scale,
                   su_p, su_n, su_k, su_r, sm_q, sm_s, sm_r, sm_o, si_r, si_q, si_k, sb_n, sb_o, sy_n, sy_o,
                   sx_n, sx_k, sw_k, sw_o, st_n, st_k, GROUP,
                   MIX: tl.constexpr, HAS_BASE: tl.constexpr, LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr,
                   STORE_U: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # one program per (token tile, head, column block), GROUP token tiles at a time, token tile
    # fastest inside a group (routedlora/ops/tile_order.py): GROUP = 1 shares a token tile's x rows
    # among the programs side by side; a larger GROUP also shares each column panel of a base weight
    # too large for L2 among GROUP of them, so it streams from HBM once per group, not per tile
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(OH, BLOCK_O)
    per_group = GROUP * HEADS * col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP)
    local = pid % per_group
    pid_n = first + local % size
    col = local // size
    q = col // col_blocks
    pid_o = col % col_blocks
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    tok = tl.load(ORDER + offs, mask=valid, other=0)
    rows = tl.load(SROWS + offs, mask=valid, other=ROW_PAD)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = oo < OH
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    poison = tl.zeros((BLOCK_N,), dtype=tl.int32)  # tokens whose row or skill is out of range
    row = tl.min(rows, axis=0)
    while row < ROW_PAD:
        seg = valid & (rows == row)
        if MIX:
            mixed = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
            for j in range(K):
                s, wj, ok = _slot(IDX, WGT, row, q, j, si_r, si_q, si_k, ROWS, SKILLS)
                poison = tl.where(seg & ~ok, 1, poison)
                b = tl.load(M + q * sm_q + s * sm_s + rr[:, None] * sm_r + oo[None, :] * sm_o,
                            mask=rmask[:, None] & omask[None, :], other=0.0)
                mixed += wj * b.to(tl.float32)
            u = _sum_parts(U + tok[:, None] * su_n + rr[None, :] * su_r, seg[:, None] & rmask[None, :], SPLITS, su_p,
                           BLOCK_N, BLOCK_R)
            if STORE_U:
                if (q == 0) & (pid_o == 0):  # one program per token tile keeps the summed u for backward
                    tl.store(UOUT + tok[:, None] * st_n + rr[None, :], u, mask=seg[:, None] & rmask[None, :])
            acc += tl.dot(u.to(M.dtype.element_ty), mixed.to(M.dtype.element_ty), input_precision=PREC)
        else:
            for j in range(K):
                s, wj, ok = _slot(IDX, WGT, row, q, j, si_r, si_q, si_k, ROWS, SKILLS)
                poison = tl.where(seg & ~ok, 1, poison)
                b = tl.load(M + q * sm_q + s * sm_s + rr[:, None] * sm_r + oo[None, :] * sm_o,
                            mask=rmask[:, None] & omask[None, :], other=0.0)
                z = _sum_parts(U + tok[:, None] * su_n + j * su_k + rr[None, :] * su_r, seg[:, None] & rmask[None, :],
                               SPLITS, su_p, BLOCK_N, BLOCK_R)
                if STORE_U:
                    if (q == 0) & (pid_o == 0):
                        tl.store(UOUT + tok[:, None] * st_n + j * st_k + rr[None, :], z,
                                 mask=seg[:, None] & rmask[None, :])
                acc += tl.dot((z * wj).to(b.dtype), b, input_precision=PREC)
        row = _next_row(rows, row)
    acc = acc * scale
    mask = valid[:, None] & omask[None, :]
    cols = (q * OH + oo).to(tl.int64)  # column * stride of a large base weight (an LM head) can pass 2**31
    if LINEAR:
        # the base linear in the same tile: x Wᵀ accumulated onto the delta (no delta in memory)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, DIN, BLOCK_K):
            kmask = (k0 + kk) < DIN
            xt = tl.load(X + tok[:, None] * sx_n + (k0 + kk)[None, :] * sx_k, mask=valid[:, None] & kmask[None, :],
                         other=0.0)
            wt = tl.load(WT + (k0 + kk).to(tl.int64)[:, None] * sw_k + cols[None, :] * sw_o,
                         mask=kmask[:, None] & omask[None, :],
                         other=0.0)
            acc += tl.dot(xt, wt, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=omask, other=0.0).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += tl.load(BASE + tok[:, None] * sb_n + cols[None, :] * sb_o, mask=mask, other=0.0).to(tl.float32)
    acc = tl.where(poison[:, None] != 0, float("nan"), acc)
    tl.store(Y + tok[:, None] * sy_n + cols[None, :] * sy_o, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(WIDE, VR, IDX, WGT, RIDS, OUT,
                        N, ROWS, WIDTH, RANK, K, SKILLS, CHUNK, scale,
                        sw_n, sw_w, sv_n, sv_k, sv_r, si_r, si_q, si_k, so_p, so_q, so_s, so_w, so_r,
                        SHARED_V: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    # program (head, skill block, column block; token chunk): the gradients of BLOCK_M skills at once,
    # acc[w, (s, k)] = Σ_n wide[n, w] · coef[n, s] · v[n, k], so the chunk of `wide` is read once for
    # all of them (not once per skill)
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(WIDTH, BLOCK_W)
    skill_blocks = tl.cdiv(SKILLS, BLOCK_M)
    q = pid // (skill_blocks * col_blocks)
    s0 = ((pid // col_blocks) % skill_blocks) * BLOCK_M
    ww = (pid % col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = ww < WIDTH
    part = tl.program_id(1)
    n_end = tl.minimum(N, (part + 1) * CHUNK)
    ms = s0 + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANK
    acc = tl.zeros((BLOCK_W, BLOCK_M * BLOCK_R), dtype=tl.float32)
    for n0 in range(part * CHUNK, n_end, BLOCK_N):
        nn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # token * stride can pass 2**31
        nmask = nn < n_end
        rows = tl.load(RIDS + nn, mask=nmask, other=0)
        row_ok = (rows >= 0) & (rows < ROWS)
        rows = tl.where(row_ok, rows, 0)
        wide = tl.load(WIDE + nn[:, None] * sw_n + (q * WIDTH + ww)[None, :] * sw_w,
                       mask=nmask[:, None] & wmask[None, :], other=0.0)
        if SHARED_V:
            coef = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in range(K):
                coef += _slot_coef(IDX, WGT, rows, row_ok, nmask, ms, q, j, si_r, si_q, si_k, SKILLS)
            v = tl.load(VR + nn[:, None] * sv_n + rr[None, :] * sv_r, mask=nmask[:, None] & rmask[None, :], other=0.0)
            rank = coef[:, :, None] * v[:, None, :]
        else:
            rank = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j in range(K):
                v = tl.load(VR + nn[:, None] * sv_n + j * sv_k + rr[None, :] * sv_r,
                            mask=nmask[:, None] & rmask[None, :], other=0.0)
                coef = _slot_coef(IDX, WGT, rows, row_ok, nmask, ms, q, j, si_r, si_q, si_k, SKILLS)
                rank += coef[:, :, None] * v[:, None, :]
        acc += tl.dot(tl.trans(wide), tl.reshape(rank, (BLOCK_N, BLOCK_M * BLOCK_R)).to(wide.dtype),
                      input_precision=PREC)
    ff = tl.arange(0, BLOCK_M * BLOCK_R)
    fs = s0 + ff // BLOCK_R
    fk = ff % BLOCK_R
    tl.store(OUT + part * so_p + q * so_q + fs[None, :] * so_s + ww[:, None] * so_w + fk[None, :] * so_r,
             (acc * scale).to(OUT.dtype.element_ty),
             mask=wmask[:, None] & ((fs < SKILLS) & (fk < RANK))[None, :])


@triton.jit
def _segment_sum_kernel(P, Q, ORDER, OFFS, OUT, COLS, P_PARTS, Q_PARTS, sp_p, sp_n, sq_p, sq_n, so_r,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # per routing row: Σ over its tokens of every partial of P then of Q (fixed order, deterministic)
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
        m2 = tmask[:, None] & cmask[None, :]
        for p in range(P_PARTS):
            acc += tl.sum(tl.load(P + p * sp_p + tok[:, None] * sp_n + cc[None, :], mask=m2, other=0.0), axis=0)
        for p in range(Q_PARTS):
            acc += tl.sum(tl.load(Q + p * sq_p + tok[:, None] * sq_n + cc[None, :], mask=m2, other=0.0), axis=0)
    tl.store(OUT + row * so_r + cc, acc, mask=cmask)


@triton.jit
def _row_block(WIDE, RANK, OUT, ORDER, start, end, col0, WIDTH, RANKS, scale, sw_n, sw_w, sr_n, sr_r, so_w, so_r,
               PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    # OUT[w, k] = scale * Σ_{t in the row} WIDE[t, col0 + w] * RANK[t, k], in token order (deterministic)
    ww = col0 + tl.arange(0, BLOCK_W)
    wmask = ww < WIDTH
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < RANKS
    acc = tl.zeros((BLOCK_W, BLOCK_R), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        tt = t0 + tl.arange(0, BLOCK_N)
        tmask = tt < end
        tok = tl.load(ORDER + tt, mask=tmask, other=0)
        wide = tl.load(WIDE + tok[:, None] * sw_n + ww[None, :] * sw_w, mask=tmask[:, None] & wmask[None, :],
                       other=0.0)
        rank = tl.load(RANK + tok[:, None] * sr_n + rr[None, :] * sr_r, mask=tmask[:, None] & rmask[None, :],
                       other=0.0)
        acc += tl.dot(tl.trans(wide), rank.to(wide.dtype), input_precision=PREC)
    tl.store(OUT + ww[:, None] * so_w + rr[None, :] * so_r, acc * scale, mask=wmask[:, None] & rmask[None, :])


@triton.jit
def _row_reduce_kernel(X, DU, GRAD, U, ORDER, OFFS, G, HH, D, O, RANKS, XBLOCKS, scale,
                       sx_n, sx_d, sdu_n, sdu_r, sg_n, sg_o, su_n, su_r, sG_r, sG_w, sG_k, sH_r, sH_w, sH_k,
                       PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    # per routing row, one pass over its tokens: G_ρ = x_ρᵀ dU_ρ (column blocks c < XBLOCKS) or
    # H_ρ = scale · g_ρᵀ u_ρ (the rest); x and the gradient are each read once in all
    row = tl.program_id(0)
    c = tl.program_id(1)
    start = tl.load(OFFS + row)
    end = tl.load(OFFS + row + 1)
    if c < XBLOCKS:
        _row_block(X, DU, G + row.to(tl.int64) * sG_r, ORDER, start, end, c * BLOCK_W, D, RANKS, 1.0,
                   sx_n, sx_d, sdu_n, sdu_r, sG_w, sG_k, PREC, BLOCK_N, BLOCK_W, BLOCK_R)
    else:
        _row_block(GRAD, U, HH + row.to(tl.int64) * sH_r, ORDER, start, end, (c - XBLOCKS) * BLOCK_W, O, RANKS,
                   scale, sg_n, sg_o, su_n, su_r, sH_w, sH_k, PREC, BLOCK_N, BLOCK_W, BLOCK_R)


@triton.jit
def _mix_block(P, M, DM, IDX, WGT, DWP, q, col0, R, WIDTH, RANK, K, SKILLS, store_dm, dwp_col, NB,
               sp_r, sp_w, sp_k, sm_q, sm_s, sm_w, sm_r, sd_q, sd_s, sd_w, sd_r, si_r, si_q, si_k, H,
               SLOTS: tl.constexpr, DW: tl.constexpr,
               BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # one (BLOCK_W columns x rank) tile of head q's per-row reductions P, for every row:
    # DM[q, s] = Σ_ρ coef_ρs P_ρ (all skills at once), and ⟨M_qs, P_ρ⟩ per (row, slot) into DWP
    ff = tl.arange(0, BLOCK_W * BLOCK_R)
    col = col0 + ff // BLOCK_R
    rk = ff % BLOCK_R
    fmask = (col < WIDTH) & (rk < RANK)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < SKILLS
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    m_off = q * sm_q + col * sm_w + rk * sm_r
    if DW and not SLOTS:  # every skill's tile, kept for all rows
        m_all = tl.load(M + ms[:, None] * sm_s + m_off[None, :], mask=mmask[:, None] & fmask[None, :],
                        other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_W * BLOCK_R), dtype=tl.float32)
    for r32 in range(0, R):
        row = tl.full((), 0, tl.int64) + r32  # row * stride of the (R, width, rank) reductions can pass 2**31
        ri = row * si_r + q * si_q
        p_off = row * sp_r + (q * WIDTH + col) * sp_w
        dwp = DWP + ((row * H + q) * K) * NB + dwp_col
        if SLOTS:  # outputs combine: slot j's own rank columns
            for j in range(K):
                s = tl.load(IDX + ri + j * si_k)
                wj = tl.load(WGT + ri + j * si_k).to(tl.float32)
                s_ok = (s >= 0) & (s < SKILLS)
                tile = tl.load(P + p_off + (j * RANK + rk) * sp_k, mask=fmask, other=0.0)
                acc += tl.where(ms == s, wj, 0.0)[:, None] * tile[None, :]
                if DW:
                    mj = tl.load(M + tl.where(s_ok, s, 0) * sm_s + m_off, mask=fmask, other=0.0).to(tl.float32)
                    tl.store(dwp + j * NB, tl.where(s_ok, tl.sum(mj * tile, axis=0), float("nan")))
        else:  # params combine: one reduction per row and head, mixed with the row's dense weights
            sel = tl.load(IDX + ri + kk * si_k, mask=kmask, other=-1)
            wv = tl.load(WGT + ri + kk * si_k, mask=kmask, other=0.0).to(tl.float32)
            tile = tl.load(P + p_off + rk * sp_k, mask=fmask, other=0.0)
            wd = tl.sum(tl.where(ms[:, None] == sel[None, :], wv[None, :], 0.0), axis=1)
            acc += wd[:, None] * tile[None, :]
            if DW:
                dots = tl.sum(m_all * tile[None, :], axis=1)
                per_slot = tl.sum(tl.where(sel[:, None] == ms[None, :], dots[None, :], 0.0), axis=1)
                per_slot = tl.where((sel >= 0) & (sel < SKILLS), per_slot, float("nan"))
                tl.store(dwp + kk * NB, per_slot, mask=kmask)
    if store_dm != 0:
        tl.store(DM + q * sd_q + ms[:, None] * sd_s + (col * sd_w + rk * sd_r)[None, :],
                 acc.to(DM.dtype.element_ty), mask=mmask[:, None] & fmask[None, :])


@triton.jit
def _mix_grads_kernel(G, HH, A, B, DA, DB, IDX, WGT, DWP, R, DH, OH, RANK, K, SKILLS, HEADS, ABLOCKS,
                      store_da, store_db, NB,
                      sG_r, sG_w, sG_k, sH_r, sH_w, sH_k, sa_q, sa_s, sa_d, sa_r, sb_q, sb_s, sb_r, sb_o,
                      sda_q, sda_s, sda_d, sda_r, sdb_q, sdb_s, sdb_r, sdb_o, si_r, si_q, si_k,
                      SLOTS: tl.constexpr, DW_A: tl.constexpr, DW_B: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # the skills' gradients and the routing-weight partials from the per-row reductions: program
    # (head, column block); blocks c < ABLOCKS read G against A, the rest H against B
    q = tl.program_id(0)
    c = tl.program_id(1)
    if c < ABLOCKS:
        _mix_block(G, A, DA, IDX, WGT, DWP, q, c * BLOCK_W, R, DH, RANK, K, SKILLS, store_da, c, NB,
                   sG_r, sG_w, sG_k, sa_q, sa_s, sa_d, sa_r, sda_q, sda_s, sda_d, sda_r, si_r, si_q, si_k, HEADS,
                   SLOTS, DW_A, BLOCK_W, BLOCK_R, BLOCK_M, BLOCK_K)
    else:
        # dw partial column: after A's blocks when A contributes, else from 0
        col_b = c if DW_A else c - ABLOCKS
        _mix_block(HH, B, DB, IDX, WGT, DWP, q, (c - ABLOCKS) * BLOCK_W, R, OH, RANK, K, SKILLS, store_db, col_b,
                   NB, sH_r, sH_w, sH_k, sb_q, sb_s, sb_o, sb_r, sdb_q, sdb_s, sdb_o, sdb_r, si_r, si_q, si_k, HEADS,
                   SLOTS, DW_B, BLOCK_W, BLOCK_R, BLOCK_M, BLOCK_K)
