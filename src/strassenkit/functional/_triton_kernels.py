"""The Triton kernels of :mod:`.triton_stl` (imported lazily: importing this module imports Triton
and builds the kernels, compiled or, with ``TRITON_INTERPRET=1``, interpreted). Read
:mod:`.triton_stl` for what they compute; the wrappers there check shapes and launch them."""

import triton
import triton.language as tl


@triton.jit
def _load_tiles(x_ptr, t, e, T, Mt, Kt, M, K, sxb, sxm, sxk, TN: tl.constexpr, TM: tl.constexpr):
    # [BLOCK_T, E_PAD] block: tile t (row tile R = t // Kt of sample b, column tile c), element e = i*TM + j
    Rt = t // Kt
    c = t % Kt
    b = (Rt // Mt).to(tl.int64)
    a = Rt % Mt
    i = e // TM
    j = e % TM
    row = a[:, None] * TN + i[None, :]
    col = c[:, None] * TM + j[None, :]
    mask = (t[:, None] < T) & (e[None, :] < TN * TM) & (row < M) & (col < K)
    ptr = x_ptr + b[:, None] * sxb + row.to(tl.int64) * sxm + col.to(tl.int64) * sxk
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def encode_kernel(x_ptr, e_ptr, out_ptr, T, Mt, Kt, M, K, sxb, sxm, sxk, se_r, se_e, so_r,
                  R: tl.constexpr, TN: tl.constexpr, TM: tl.constexpr, R_PAD: tl.constexpr,
                  E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_PAD)
    lr = tl.arange(0, R_PAD)
    xt = _load_tiles(x_ptr, t, e, T, Mt, Kt, M, K, sxb, sxm, sxk, TN, TM)  # [BLOCK_T, E_PAD]
    emask = (lr[None, :] < R) & (e[:, None] < TN * TM)
    et = tl.load(e_ptr + lr[None, :] * se_r + e[:, None] * se_e, mask=emask, other=0.0).to(tl.float32)  # E^T
    if IEEE:
        acc = tl.dot(xt, et, input_precision="ieee")
    else:
        acc = tl.dot(xt, et, input_precision="tf32")
    omask = (t[:, None] < T) & (lr[None, :] < R)
    optr = out_ptr + lr[None, :].to(tl.int64) * so_r + t[:, None].to(tl.int64)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def decode_kernel(p_ptr, d_ptr, y_ptr, T, Mt, Nt, M, N, sp_r, sd_o, sd_l, syb, sym, syn,
                  R: tl.constexpr, TN: tl.constexpr, TP: tl.constexpr, R_PAD: tl.constexpr,
                  O_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    lr = tl.arange(0, R_PAD)
    o = tl.arange(0, O_PAD)
    pmask = (t[:, None] < T) & (lr[None, :] < R)
    pt = tl.load(p_ptr + lr[None, :].to(tl.int64) * sp_r + t[:, None].to(tl.int64), mask=pmask, other=0.0)
    dmask = (lr[:, None] < R) & (o[None, :] < TN * TP)
    dt = tl.load(d_ptr + o[None, :] * sd_o + lr[:, None] * sd_l, mask=dmask, other=0.0).to(tl.float32)  # D^T
    if IEEE:
        acc = tl.dot(pt.to(tl.float32), dt, input_precision="ieee")  # [BLOCK_T, O_PAD]
    else:
        acc = tl.dot(pt.to(tl.float32), dt, input_precision="tf32")
    Rt = t // Nt
    c = t % Nt
    b = (Rt // Mt).to(tl.int64)
    a = Rt % Mt
    i = o // TP
    k = o % TP
    row = a[:, None] * TN + i[None, :]
    col = c[:, None] * TP + k[None, :]
    ymask = (t[:, None] < T) & (o[None, :] < TN * TP) & (row < M) & (col < N)
    yptr = y_ptr + b[:, None] * syb + row.to(tl.int64) * sym + col.to(tl.int64) * syn
    tl.store(yptr, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def wgrad_kernel(x_ptr, g_ptr, part_ptr, T, Mt, Kt, M, K, sxb, sxm, sxk, sg_r, n_iter,
                 R: tl.constexpr, TN: tl.constexpr, TM: tl.constexpr, R_PAD: tl.constexpr,
                 E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    e = tl.arange(0, E_PAD)
    lr = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, E_PAD), dtype=tl.float32)
    for it in range(0, n_iter):
        t = (it * nprog + pid) * BLOCK_T + tl.arange(0, BLOCK_T)
        xt = _load_tiles(x_ptr, t, e, T, Mt, Kt, M, K, sxb, sxm, sxk, TN, TM)  # [BLOCK_T, E_PAD]
        gmask = (lr[:, None] < R) & (t[None, :] < T)
        gt = tl.load(g_ptr + lr[:, None].to(tl.int64) * sg_r + t[None, :].to(tl.int64), mask=gmask, other=0.0)
        if IEEE:
            acc += tl.dot(gt.to(tl.float32), xt, input_precision="ieee")  # [R_PAD, E_PAD]
        else:
            acc += tl.dot(gt.to(tl.float32), xt, input_precision="tf32")
    pptr = part_ptr + pid * (R_PAD * E_PAD) + lr[:, None] * E_PAD + e[None, :]
    tl.store(pptr, acc)
