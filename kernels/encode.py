"""Variable-L0 encoders (ReLU, JumpReLU, Gated SAEs): one GEMM that emits a CSR code.

``threshold_encode`` keeps the pre-activations ``pre = (x - b_dec) W^T + b`` above a
per-latent cutoff; ``gated_encode`` keeps the entries whose gate ``pi = (x - b_dec) W^T + b``
is open and computes the magnitude path ``relu(pi * exp(r_mag) + b_mag)`` in the same
epilogue. Neither writes an ``N x d_sae`` tensor.

How a data-dependent nnz comes out of a fixed grid:

* The grid is the usual 2-D tiling of the GEMM (row blocks x latent blocks, grouped so that
  programs running together share tiles of W in L2). Every program computes one tile of the
  pre-activation, finds the entries to keep, and appends them to a per-row buffer of
  ``capacity`` slots. A per-row int32 counter, bumped with one atomic add per (row, tile),
  hands out the slots, so several programs can fill the same row without coordination.
  Within a tile the slots are given out in latent order (an exclusive cumsum of the keep
  mask), so each tile's run is sorted; the runs of different tiles land in whatever order
  the programs happened to run, which the launcher fixes with one per-row sort of at most
  ``capacity`` int32 keys.
* The counter keeps counting past the capacity, so after the pass we know every row's true
  count. Rows that did not fit are recomputed (only those rows) with exactly the capacity
  they need; the rest of the batch is not redone.
* The launcher turns the padded buffers into CSR with O(N * capacity) torch ops.

``b_dec`` is folded into the bias (``b - W b_dec``, computed once in fp32) instead of being
subtracted from every x tile: the GEMM then reads x as given, so bf16/fp16 inputs are not
rounded a second time after the subtraction, and the K loop does no extra work.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastsae import selection, torch_backend
from fastsae.torch_backend import stable_topk

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# What a first pass reserves per row when the caller gives no estimate. Typical JumpReLU and
# Gated SAEs fire tens to a few hundred latents per token; a row that needs more costs one
# recomputation of that row only.
DEFAULT_CAPACITY = 256


# The configs a GPU autotunes over; bench/gpu_static.py compiles each for sm_90 in every mode
# and fails CI on a spill, on shared memory over 227 KB or on a GEMM without wgmma. The
# 128x128 / 64x256 / 64x128x32 tiles spilled 1.4-1.7 KB per thread in the gated epilogue
# (Triton 3.6) and are left out.
CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# The interpreter cannot benchmark configs (and is slow per op): one small tile, small
# enough that test shapes span several latent tiles and so exercise the slot atomics.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4,
                                     num_stages=1)]


def _configs():
    return CUDA_CONFIGS if torch.cuda.is_available() else INTERPRETER_CONFIGS


def configs_for(configs, is_fp32: bool):
    """The configs a call may use: fp32 tiles take twice the shared memory per stage, and the
    4-stage pipeline spills there (24 bytes per thread, gpu_static), so fp32 runs 3 stages."""
    return [c for c in configs if not (is_fp32 and c.num_stages > 3)] or configs


def _prune(configs, named_args, **_):
    return configs_for(configs, named_args["x_ptr"].dtype == torch.float32)


# Epilogue modes of the one encode kernel.
THRESHOLD: tl.constexpr = tl.constexpr(0)  # keep pre > cutoff[latent] (ReLU, JumpReLU)
GATED: tl.constexpr = tl.constexpr(1)  # keep pi > 0, magnitudes from r_mag, b_mag
ROW_CUT: tl.constexpr = tl.constexpr(2)  # keep pre >= cutoff[row] (TopK survivors)
GROUP_MAX: tl.constexpr = tl.constexpr(3)  # per-row maxima of groups of latents (TopK's cut)

# Latents per group in GROUP_MAX mode; every config's BLOCK_N is a multiple of it.
GROUP_SIZE = 8


# The smallest BLOCK_N among the configs: the per-row L1 partial sums get one column per
# latent tile of that width, so whichever config the tuner picks fits the same buffer
# (16384 x 1024 fp32 = 64 MB at d_sae = 131072 on a GPU).
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _configs())


@triton.autotune(
    configs=_configs(),
    # N is left out of the key: the retry pass runs on a handful of rows and should reuse
    # the tile shape tuned for the batch rather than trigger a second tuning.
    key=["m_lat", "d_in", "MODE"],
    # Tuning runs the kernel several times; counters and L1 partials must start at zero.
    reset_to_zero=["count_ptr", "l1_ptr"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, bias_ptr, cutoff_ptr, scale_ptr, bmag_ptr, dnorm_ptr,
    count_ptr, idx_ptr, val_ptr, pi_ptr, l1_ptr,
    n_rows, m_lat, d_in, capacity,
    stride_xn, stride_wm, stride_buf, stride_l1,
    MODE: tl.constexpr, HAS_L1: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the latent tiles together, so a tile of
    # W (the large operand) is read from HBM once per group instead of once per row block.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(m_lat, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    # Latent tiles are visited last to first. Correctness never depends on the order, and
    # the interpreter, which runs programs in pid order, then fills each row out of latent
    # order, so CPU tests exercise the launcher's per-row sort as a GPU's scheduling would.
    pid_n = num_pid_n - 1 - (pid % per_group) // group_rows

    local_rows = tl.arange(0, BLOCK_M)
    local_cols = tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + local_rows
    cols = pid_n * BLOCK_N + local_cols
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < m_lat
    # Offsets past 2**31 (N * capacity, d_sae * d_in at real sizes) go into the scalar base
    # pointers in 64-bit; the per-element offsets stay int32 and within one tile. Per-element
    # int64 offsets cost registers the epilogue does not have (they made every config spill).
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    x_ptrs = x_ptr + row0 * stride_xn + local_rows[:, None] * stride_xn + ks[None, :]
    # A [K, N] tile of W^T.
    w_ptrs = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_wm + local_cols[None, :] * stride_wm + ks[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k_ok = (k0 + ks) < d_in
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    pre = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if MODE == GROUP_MAX:
        # Maxima of relu(pre) over groups of GROUP latents, into val_ptr[N, cdiv(m, GROUP)]
        # (padding columns read -1, below every ReLU value). A NaN counts as +inf: the GPU's
        # max.f32 would drop it and the interpreter's max keep it; +inf is kept by both (its
        # row's cut then keeps too few entries, and the launcher redoes the row in torch).
        r = tl.where(pre != pre, float("inf"), tl.where(pre < 0.0, 0.0, pre))
        r = tl.where(col_ok[None, :], r, -1.0)
        gmax = tl.max(tl.reshape(r, [BLOCK_M, BLOCK_N // GROUP, GROUP]), axis=2)
        groups = pid_n * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
        ok = row_ok[:, None] & (groups[None, :] * GROUP < m_lat)
        tl.store(val_ptr + row0 * stride_buf + local_rows[:, None] * stride_buf + groups[None, :], gmax, mask=ok)
        return
    if MODE == GATED:
        keep = pre > 0.0
    elif MODE == ROW_CUT:
        # TopK survivors: entries at or above the row's cut (which is > 0, so ReLU is implied).
        keep = pre >= tl.load(cutoff_ptr + rows, mask=row_ok, other=float("inf"))[:, None]
    else:
        keep = pre > tl.load(cutoff_ptr + cols, mask=col_ok, other=0.0)[None, :]
    keep = keep & row_ok[:, None] & col_ok[None, :]

    if HAS_L1:
        # Each (row, latent tile) writes its own partial sum: no float atomics, so the
        # result does not depend on the order the programs ran in.
        dnorm = tl.load(dnorm_ptr + cols, mask=col_ok, other=0.0)
        part = tl.sum(tl.where(keep, pre * dnorm[None, :], 0.0), axis=1)
        tl.store(l1_ptr + row0 * stride_l1 + local_rows * stride_l1 + pid_n, part, mask=row_ok)

    flag = keep.to(tl.int32)
    n_keep = tl.sum(flag, axis=1)
    # Reserve n_keep consecutive slots of each row; rows with nothing to add skip the atomic.
    # Only the returned old value matters (it must be unique), hence relaxed ordering.
    base = tl.atomic_add(count_ptr + rows, n_keep, mask=row_ok & (n_keep > 0), sem="relaxed")
    slot = base[:, None] + tl.cumsum(flag, axis=1) - flag
    # Slots past the capacity are dropped; the counter still records them, and the launcher
    # recomputes such rows with room for all of them.
    store = keep & (slot < capacity)
    buf = local_rows[:, None] * stride_buf + slot
    idx_ptr += row0 * stride_buf
    val_ptr += row0 * stride_buf
    tl.store(idx_ptr + buf, (cols[None, :] + tl.zeros_like(flag)), mask=store)
    if MODE == GATED:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        bmag = tl.load(bmag_ptr + cols, mask=col_ok, other=0.0)
        mag = pre * scale[None, :] + bmag[None, :]
        mag = tl.where(mag < 0.0, 0.0, mag)  # a ReLU that keeps NaN (max.f32 on a GPU would not)
        tl.store(val_ptr + buf, mag.to(val_ptr.dtype.element_ty), mask=store)
        pi_ptr += row0 * stride_buf
        tl.store(pi_ptr + buf, pre.to(pi_ptr.dtype.element_ty), mask=store)
    else:
        tl.store(val_ptr + buf, pre.to(val_ptr.dtype.element_ty), mask=store)


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_tensor(fn, name, t, ndim, shape_desc, dtype=None, device=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be a {ndim}-D tensor {shape_desc}, got shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} (the dtype of x), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} must be on {device} (the device of x), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous; call .contiguous() first")


def _check_vector(fn, name, t, length, what, dtype, device):
    _check_tensor(fn, name, t, 1, f"[{what}]", dtype, device)
    if t.shape[0] != length:
        raise ValueError(f"{fn}: {name} must have shape ({length},) [{what}], got {tuple(t.shape)}")


def _check_common(fn, x, W, b, b_dec, W_name, b_name):
    _check_tensor(fn, "x", x, 2, "[N, d_in]")
    dtype, device = x.dtype, x.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{fn}: x is on {device}; the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before importing triton)")
    _check_tensor(fn, W_name, W, 2, "[d_sae, d_in]", dtype, device)
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: {W_name} must have shape (d_sae, {x.shape[1]}) to match x's d_in = "
                         f"{x.shape[1]}, got {tuple(W.shape)}")
    m, d_in = W.shape
    if m == 0 or d_in == 0:
        raise ValueError(f"{fn}: {W_name} must have d_sae >= 1 and d_in >= 1, got {tuple(W.shape)}")
    _check_vector(fn, b_name, b, m, "d_sae", dtype, device)
    if b_dec is not None:
        _check_vector(fn, "b_dec", b_dec, d_in, "d_in", dtype, device)
    return m, d_in


def _check_capacity(fn, capacity):
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
        raise ValueError(f"{fn}: capacity must be a positive int or None, got {capacity!r}")


# --------------------------------------------------------------------------------------------
# Launch and compaction


def _folded_bias(W, b, b_dec):
    """b - W @ b_dec in fp32, in row chunks so W is never copied whole to fp32."""
    bias = b.to(torch.float32)
    if b_dec is None:
        return bias.contiguous()
    bias = bias.clone()
    bd = b_dec.to(torch.float32)
    step = max(1, (1 << 24) // W.shape[1])
    for start in range(0, W.shape[0], step):
        bias[start:start + step] -= W[start:start + step].to(torch.float32) @ bd
    return bias


def _precision(dtype):
    # fp32 follows torch's own matmul setting, so the kernel keeps exactly what the torch
    # backend would (IEEE by default); 16-bit inputs are unaffected.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _run_pass(x, W, bias, cutoff, scale, bmag, dnorm, capacity, mode):
    """One kernel pass over the rows of x; returns the padded buffers and true counts."""
    gated = mode == GATED.value
    n, d_in = x.shape
    m = W.shape[0]
    device = x.device
    counts = torch.zeros(n, dtype=torch.int32, device=device)
    idx = torch.empty(n, capacity, dtype=torch.int32, device=device)
    # TopK survivors keep their fp32 values: the top-k among them is ranked in fp32.
    val = torch.empty(n, capacity, dtype=torch.float32 if mode == ROW_CUT.value else x.dtype, device=device)
    pi = torch.empty(n, capacity, dtype=x.dtype, device=device) if gated else val
    has_l1 = dnorm is not None
    l1 = torch.zeros(n, triton.cdiv(m, _MIN_BLOCK_N) if has_l1 else 1, dtype=torch.float32, device=device)
    dummy = bias

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    _encode_kernel[grid](
        x, W, bias,
        cutoff if cutoff is not None else dummy,
        scale if gated else dummy, bmag if gated else dummy,
        dnorm if has_l1 else dummy,
        counts, idx, val, pi, l1,
        n, m, d_in, capacity,
        x.stride(0), W.stride(0), idx.stride(0), l1.stride(0),
        MODE=mode, HAS_L1=has_l1, PRECISION=_precision(x.dtype), GROUP=GROUP_SIZE,
    )
    return counts, idx, val, pi, (l1.sum(1) if has_l1 else None)


def _group_maxima(x, W, bias, m_sub):
    """[N, cdiv(m_sub, GROUP_SIZE)] fp32 maxima of relu(pre) over groups of the first m_sub
    latents: the GEMM on that subset, nothing N x m_sub written."""
    n, d_in = x.shape
    out = torch.empty(n, triton.cdiv(m_sub, GROUP_SIZE), dtype=torch.float32, device=x.device)
    scratch = torch.zeros(max(1, n), dtype=torch.int32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m_sub, meta["BLOCK_N"]),)

    _encode_kernel[grid](
        x, W, bias, bias, bias, bias, bias,
        scratch, scratch, out, out, bias,
        n, m_sub, d_in, 0,
        x.stride(0), W.stride(0), out.stride(0), 0,
        MODE=GROUP_MAX.value, HAS_L1=False, PRECISION=_precision(x.dtype), GROUP=GROUP_SIZE,
    )
    return out


def _sort_rows(idx, bufs, counts, m):
    """Sort each row's filled slots by latent; filled slots stay first. Returns the mask of
    filled slots, the sorted indices and the value buffers permuted alike."""
    cap = idx.shape[1]
    filled = torch.arange(cap, device=idx.device)[None, :] < counts[:, None]
    keys = torch.where(filled, idx, m)  # unfilled slots sort last
    keys, order = torch.sort(keys, dim=1)
    return filled, keys, [v.gather(1, order) for v in bufs]


def _encode(x, W, bias, cutoff, scale, bmag, dnorm, capacity, mode):
    gated = mode == GATED.value
    n = x.shape[0]
    m = W.shape[0]
    device = x.device
    cap = min(m, capacity if capacity is not None else DEFAULT_CAPACITY)
    counts, idx, val, pi, l1 = _run_pass(x, W, bias, cutoff, scale, bmag, dnorm, cap, mode)
    bufs = [val, pi] if gated else [val]
    # Rows whose count fits were stored whole; the rest are recomputed below. The first pass
    # already saw every entry, so its counts are exact and its L1 is final.
    counts = counts.to(torch.int64)
    over = counts > cap
    filled, keys, bufs = _sort_rows(idx, bufs, counts.clamp(max=cap), m)

    if not bool(over.any()):
        row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=row_offsets[1:])
        # Row-major masked selection of the leading filled slots is already CSR order.
        outs = [keys[filled].to(torch.int64)] + [v[filled] for v in bufs]
        return outs, row_offsets, l1

    # Some rows overflowed: recompute exactly those, with the room they need. Their counts
    # from the recomputation are the ones used (the same GEMM, but this keeps CSR
    # self-consistent even if a value on the cutoff came out differently). Loop in case a
    # recomputed row still does not fit.
    parts = []  # (rows of x, filled mask, sorted keys, sorted value buffers)
    keep_rows = (~over).nonzero().squeeze(1)
    parts.append((keep_rows, filled[keep_rows], keys[keep_rows], [v[keep_rows] for v in bufs]))
    todo = over.nonzero().squeeze(1)
    cap2 = cap
    while todo.numel():
        # Grows every round, so the loop ends (at worst at cap2 = d_sae, where all fits).
        cap2 = min(m, max(int(counts[todo].max()), cap2 + 1))
        c2, i2, v2, p2, _ = _run_pass(x[todo], W, bias, cutoff[todo] if mode == ROW_CUT.value else cutoff,
                                      scale, bmag, None, cap2, mode)
        c2 = c2.to(torch.int64)
        counts[todo] = c2
        fit = c2 <= cap2
        f2, k2, b2 = _sort_rows(i2, [v2, p2] if gated else [v2], c2.clamp(max=cap2), m)
        sel = fit.nonzero().squeeze(1)
        parts.append((todo[sel], f2[sel], k2[sel], [v[sel] for v in b2]))
        todo = todo[~fit]

    row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    nnz = int(row_offsets[-1])
    out_idx = torch.empty(nnz, dtype=torch.int64, device=device)
    out_vals = [torch.empty(nnz, dtype=x.dtype, device=device) for _ in bufs]
    for rows, f, k, vs in parts:
        r, c = f.nonzero(as_tuple=True)
        dest = row_offsets[rows[r]] + c
        out_idx[dest] = k[f].to(torch.int64)
        for o, v in zip(out_vals, vs):
            o[dest] = v[f]
    return [out_idx] + out_vals, row_offsets, l1


def _empty_result(x, n_values):
    device = x.device
    vals = [torch.empty(0, dtype=x.dtype, device=device) for _ in range(n_values)]
    return vals, torch.empty(0, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# Launchers


def threshold_encode(x, W, b, b_dec, cutoff, *, capacity=None):
    """CSR of ``pre = (x - b_dec) @ W^T + b`` at the entries with ``pre[n, j] > cutoff[j]``.

    The contract of ``fastsae.torch_backend.threshold_encode``: returns
    ``(pre_values[nnz], indices[nnz] int64, row_offsets[N + 1] int64)``, indices ascending
    within each row, values in x's dtype. ReLU SAEs pass a zero cutoff; JumpReLU passes
    ``threshold - bandwidth / 2``.

    ``capacity`` is a guess at the largest per-row count (e.g. the previous batch's): rows
    with more entries are recomputed once with the room they need, so a good guess saves
    work and a bad one never changes the result.
    """
    fn = "threshold_encode"
    m, _ = _check_common(fn, x, W, b, b_dec, "W", "b")
    _check_vector(fn, "cutoff", cutoff, m, "d_sae", x.dtype, x.device)
    _check_capacity(fn, capacity)
    if x.shape[0] == 0:
        (vals,), idx, offs = _empty_result(x, 1)
        return vals, idx, offs
    bias = _folded_bias(W, b, b_dec)
    (idx, vals), row_offsets, _ = _encode(x, W, bias, cutoff.to(torch.float32).contiguous(),
                                          None, None, None, capacity, THRESHOLD.value)
    return vals, idx, row_offsets


def gated_encode(x, W_gate, b_gate, r_mag, b_mag, b_dec, *, dec_norm=None, capacity=None):
    """Gated SAE encode with one GEMM: ``pi = (x - b_dec) @ W_gate^T + b_gate``.

    The CSR pattern is the open gate, ``pi > 0``. Returns
    ``(mag_values, pi_values, indices, row_offsets)`` where
    ``mag = relu(pi * exp(r_mag) + b_mag)`` (kept even where it is 0: the pattern is the
    gate) and ``pi_values = pi = relu(pi)`` on the pattern. With ``dec_norm[d_sae]`` it also
    returns, fifth, the per-row ``sum_j relu(pi[n, j]) * dec_norm[j]`` (the gate's L1 term),
    reduced in fp32 in the epilogue. Values come back in x's dtype. ``capacity`` as in
    :func:`threshold_encode`.
    """
    fn = "gated_encode"
    m, _ = _check_common(fn, x, W_gate, b_gate, b_dec, "W_gate", "b_gate")
    _check_vector(fn, "r_mag", r_mag, m, "d_sae", x.dtype, x.device)
    _check_vector(fn, "b_mag", b_mag, m, "d_sae", x.dtype, x.device)
    if dec_norm is not None:
        _check_vector(fn, "dec_norm", dec_norm, m, "d_sae", x.dtype, x.device)
    _check_capacity(fn, capacity)
    if x.shape[0] == 0:
        (mag, pi), idx, offs = _empty_result(x, 2)
        out = (mag, pi, idx, offs)
        return out + (torch.empty(0, dtype=x.dtype, device=x.device),) if dec_norm is not None else out
    bias = _folded_bias(W_gate, b_gate, b_dec)
    scale = r_mag.to(torch.float32).exp()
    bmag = b_mag.to(torch.float32).contiguous()
    dnorm = None if dec_norm is None else dec_norm.to(torch.float32).contiguous()
    (idx, mag, pi), row_offsets, l1 = _encode(x, W_gate, bias, None, scale, bmag, dnorm, capacity, GATED.value)
    if dec_norm is None:
        return mag, pi, idx, row_offsets
    return mag, pi, idx, row_offsets, l1.to(x.dtype)


# --------------------------------------------------------------------------------------------
# TopK by cutoff (see fastsae.selection): a GEMM on a subset of latents gives each row a lower
# bound on its k-th value; the full GEMM keeps only entries at or above it; an exact top-k
# among those few finishes. Memory: N x capacity survivors, never N x d_sae.

# The subset is 1/SUBSET_FRACTION of the latents (at least SUBSET_GROUPS_PER_K * k groups):
# its GEMM costs that fraction of the full one, and about k * SUBSET_FRACTION entries per row
# survive (1,000-odd at d_sae 131072, k 64: 8 bytes each, against 2 bytes x d_sae dense).
SUBSET_FRACTION = 16
SUBSET_GROUPS_PER_K = 4
# Survivor slots reserved per row, as a multiple of the expected k * d_sae / subset; rows
# with more are recomputed with the room they need (never truncated).
SURVIVOR_SLACK = 2.0


def _subset_size(m, k):
    want = max(m // SUBSET_FRACTION, SUBSET_GROUPS_PER_K * k * GROUP_SIZE)
    return min(m, triton.cdiv(want, _MIN_BLOCK_N) * _MIN_BLOCK_N)


def _accumulation_error(x, W, bias):
    """Per row: a bound on how far two fp32 (or TF32) accumulations of the same products can
    disagree (the subset pass and the full pass may tile differently): twice the error bound
    of one, from ||x|| and the largest encoder row (upper bounds even where squares
    underflow), with its flushes of subnormal products and partial sums where it flushes them."""
    d = x.shape[1]
    unit = 2.0 ** -11 if _precision(x.dtype) == "tf32" and x.dtype == torch.float32 else 0.0
    gamma = 1.01 * (d + 2) * 2.0 ** -24 + 3 * unit
    accumulation = gamma * (selection.norm_bound(x.float()) * _row_norm_max(W) + bias.abs().max())
    return 2 * (1.01 * accumulation + selection.flush_error(d, 0.0, 0.0))


def _row_norm_max(W):
    """max_m ||W_m|| (an upper bound: selection.norm_bound) in fp32, a few thousand rows at a
    time so no fp32 copy of W exists."""
    step = max(1, (1 << 24) // W.shape[1])
    return torch.stack([selection.norm_bound(W[i:i + step].float()).max() for i in range(0, W.shape[0], step)]).max()


def _dense_topk(x, W, bias, k):
    """relu(x W^T + bias) and its exact top-k, for a few rows (or a small dictionary). A bf16 W
    is upcast a few thousand latents at a time, so no fp32 copy of the whole encoder exists."""
    xf = x.float()
    if W.dtype == torch.float32:
        pre = torch.addmm(bias.float(), xf, W.t())
    else:
        step = max(1, (1 << 24) // W.shape[1])
        pre = torch.empty(x.shape[0], W.shape[0], device=x.device)
        for i in range(0, W.shape[0], step):
            torch.addmm(bias[i:i + step].float(), xf, W[i:i + step].float().t(), out=pre[:, i:i + step])
    return stable_topk(torch.relu_(pre).add_(0.0), k)


def _topk_by_cutoff(x, W, bias, k):
    n = x.shape[0]
    m = W.shape[0]
    m_sub = _subset_size(m, k)
    groups = triton.cdiv(m_sub, GROUP_SIZE)
    if groups < 2 * k or m_sub == m:  # a small dictionary: its dense pre-activation is small too
        return _dense_topk(x, W, bias, k)
    gmax = _group_maxima(x, W, bias, m_sub)
    c = selection.kth_largest(gmax, k)
    cut = c - 2 * _accumulation_error(x, W, bias)
    # Computed densely below: rows with a NaN pre-activation (a group maximum of +inf, or a NaN
    # bound), which torch ranks first.
    hard = cut.isnan() | torch.isinf(gmax).any(1)
    # A row whose subset holds fewer than k positive groups (a trained encoder's negative
    # biases make positives rare) keeps every entry the full pass finds positive (>= the least
    # normal float): with k or more of them, its top-k lies among them.
    cut = torch.where(cut > 0, cut, selection.FP32_TINY).masked_fill_(hard, float("inf")).contiguous()
    capacity = min(m, 1 << max(1, (int(SURVIVOR_SLACK * k * m / m_sub) - 1).bit_length()))
    (cols, vals), row_offsets, _ = _encode(x, W, bias, cut, None, None, None, capacity, ROW_CUT.value)
    rows = torch_backend.csr_row_ids(row_offsets, cols.numel())
    values, indices = selection.topk_of_survivors(vals.float(), rows, cols, n, k)
    # Also computed densely: rows with fewer than k positive entries (ReLU zeros in the top-k).
    hard_rows = (hard | (values[:, k - 1] == float("-inf"))).nonzero().squeeze(1)
    if hard_rows.numel():
        values[hard_rows], indices[hard_rows] = _dense_topk(x[hard_rows], W, bias, k)
    return values, indices


# AuxK's dead latents are encoded in chunks of at most this many (row x latent) entries, so
# its memory is bounded whatever the dead count.
AUX_CHUNK_ENTRIES = 1 << 26


def _dead_topk(x, W, bias, dead_mask, k_aux):
    """Top-k_aux among the dead latents from GEMMs on their encoder rows only (the cost
    follows the dead count), with the reference's padding when fewer are dead."""
    n = x.shape[0]
    dead = dead_mask.nonzero().squeeze(1)
    chunk = max(1, AUX_CHUNK_ENTRIES // max(1, n))
    best_v, best_i = x.new_zeros(n, 0, dtype=torch.float32), dead.new_zeros(n, 0)
    for start in range(0, dead.numel(), chunk):
        ids = dead[start:start + chunk]
        v, pos = _dense_topk(x, W[ids], bias[ids], min(k_aux, ids.numel()))
        # Earlier chunks hold lower indices: a position-stable merge keeps the tie rule.
        best_v, merged = stable_topk(torch.cat([best_v, v], 1), min(k_aux, best_v.shape[1] + v.shape[1]))
        best_i = torch.cat([best_i, ids[pos]], 1).gather(1, merged)
    return selection.pad_with_live(best_v, best_i, dead_mask, k_aux)


def _check_topk(x, W, b, b_dec, k, dead_mask, k_aux):
    fn = "topk_encode"
    m, _ = _check_common(fn, x, W, b, b_dec, "W", "b")
    for name, v in (("k", k), ("k_aux", k_aux)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if not 1 <= k <= m:
        raise ValueError(f"{fn}: k must satisfy 1 <= k <= d_sae = {m}, got {k}")
    if not 0 <= k_aux <= m:
        raise ValueError(f"{fn}: k_aux must satisfy 0 <= k_aux <= d_sae = {m}, got {k_aux}")
    if dead_mask is not None:
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool or dead_mask.shape != (m,):
            raise ValueError(f"{fn}: dead_mask must be a bool tensor of shape ({m},) [d_sae]")
        if dead_mask.device != x.device:
            raise ValueError(f"{fn}: dead_mask must be on {x.device} (the device of x), got {dead_mask.device}")


def topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0):
    """``top-k(relu((x - b_dec) W^T + b))`` and the AuxK selection among dead latents; the
    contract of ``fastsae.torch_backend.topk_encode``. Values and indices equal the
    reference's (ranked in fp32, tie rule included); see the section comment above."""
    _check_topk(x, W, b, b_dec, k, dead_mask, k_aux)
    n = x.shape[0]
    if n == 0:
        values, indices = x.new_empty(0, k, dtype=torch.float32), torch.empty(0, k, dtype=torch.long, device=x.device)
    else:
        bias = _folded_bias(W, b, b_dec)
        values, indices = _topk_by_cutoff(x, W, bias, k)
    if dead_mask is not None and k_aux > 0 and n:
        aux_values, aux_indices = _dead_topk(x, W, bias, dead_mask, k_aux)
    else:
        aux_values, aux_indices = values.new_zeros(n, k_aux), indices.new_zeros(n, k_aux)
    return values.to(x.dtype), indices, aux_values.to(x.dtype), aux_indices
