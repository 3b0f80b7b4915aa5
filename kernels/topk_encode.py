"""Fused TopK encode: ``top-k(relu((x - b_dec) W^T + b))`` without the N x d_sae pre-activation.

Same signature and results as ``fastsae.torch_backend.topk_encode``::

    topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0)
        -> (values[N, k], indices[N, k] int64, aux_values[N, k_aux], aux_indices[N, k_aux] int64)

How it works
------------
One program owns ``BLOCK_N`` rows of ``x`` and a contiguous range of latents. It walks that range
in tiles of ``BLOCK_M`` latents; for each tile it computes the pre-activation tile with an fp32
``tl.dot`` over d_in, applies ReLU, and folds the tile into a running top-k kept in registers.
Only the k winners per row ever reach memory.

Sorting needs the latent index to travel with its value, and Triton has no argsort. So every
candidate becomes one int64 *key*: the high 32 bits are the fp32 value's bits remapped so that
signed integer order equals float order, the low 32 bits are ``2**32 - 1 - index``. Keys are
unique, a larger key means a larger value, and on equal values the *lower* index has the larger
key: exactly the reference tie rule (values descending, ties by ascending index), for free.

The running top-k ``acc[BLOCK_N, KP]`` (``KP`` = k rounded up to a power of two) is kept sorted
ascending. A tile's own best ``KP`` keys come out of a bitonic top-k sorted descending; the
element-wise max of an ascending and a descending sequence holds the ``KP`` best of their union
and is bitonic, so one bitonic merge sorts it again. The network is written here (min/max over
size-2 hypercube axes) rather than taken from ``tl.topk``: it runs on every Triton >= 3.4 and is
~100x faster under the interpreter, where ``tl.topk``'s xor reductions run element by element.

AuxK rides along: with a dead mask the same tile also feeds a second running top-``k_aux`` of
``where(dead, relu(pre), -inf)``; outputs are clamped to >= 0 so slots beyond the number of dead
latents read 0 (their indices follow the -inf ties: ascending).

When there are too few row blocks to fill the GPU, d_sae is split across programs; each writes
its ``KP`` best keys (``N * KP * splits`` int64, never ``N * d_sae``) and a ``torch.topk`` over
those unique keys merges them.

``b_dec`` is folded into the bias: ``(x - b_dec) W^T + b = x W^T + (b - W b_dec)``. The kernel
then multiplies ``x`` in its storage dtype (bf16/fp16 tensor cores, products exact in fp32)
instead of rounding ``x - b_dec`` back to bf16 before the dot, which would add an error the
fp32 reference does not have. ``b - W b_dec`` is one pass over ``W`` (a GEMV, ~1% of the GEMM).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Low 32 bits of a key hold this minus the latent index, so lower indices win ties.
_INDEX_MAX = 0xFFFFFFFF
# Latent indices must fit the 32-bit field, with room for the masked tail of the last tile.
_MAX_D_SAE = 1 << 31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Compiled for sm_90 (register counts from cuobjdump): with BLOCK_K 32, 8 warps and 4 stages the
# block shapes chosen in _blocks() use 184-252 registers and no stack; BLOCK_K 64 with 3 stages
# spills at BLOCK_N 64 x BLOCK_M 128. Each config is a full compile of a large unrolled sorting
# network (5-50 s each), so only big problems autotune, over a short list.
_DEFAULT_CONFIG = dict(BLOCK_K=32, num_warps=8, num_stages=4)
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st) for bk, w, st in ((32, 8, 4), (32, 8, 3), (64, 8, 3))
]
# Problems below this many multiply-adds run the default config without autotuning.
_TUNE_MIN_MACS = 1 << 36


@triton.jit
def _pack(value, index):
    """Unique int64 key: larger value -> larger key; equal values -> lower index larger key."""
    bits = value.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flipping their magnitude bits fixes that
    # (sign bit kept, so the signed int32 order now equals the float order).
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (4294967295 - index.to(tl.int64))


@triton.jit
def _unpack(key):
    bits = (key >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    value = bits.to(tl.float32, bitcast=True)
    index = 4294967295 - (key & 4294967295)
    return value, index


# A small bitonic network of our own. The tile is viewed as a hypercube [2, 2, ..., 2]: one axis
# per bit of the (row, column) position, the column bits innermost. A compare-and-swap along a
# bit is a min and a max over that size-2 axis (kept as a size-1 axis) and a select. Reductions
# over a size-2 axis stay inside a thread's registers on a GPU, and min/max are the reductions
# Triton's interpreter runs natively in NumPy; a reduction with a custom combine function (what
# an xor-swap needs) is interpreted element by element there, ~100x slower.

@triton.jit
def _bit(N_DIMS: tl.constexpr, BIT: tl.constexpr):
    """0 at position bit BIT == 0, 1 where it is 1, shaped to broadcast over the hypercube."""
    y = tl.arange(0, 2)
    for d in tl.static_range(N_DIMS):
        if d != N_DIMS - 1 - BIT:
            y = tl.expand_dims(y, d)
    return y


@triton.jit
def _compare_swap(h, flip, N_DIMS: tl.constexpr, BIT: tl.constexpr):
    # Each pair along BIT ends up ascending (smaller first), or descending where flip is 1.
    lo = tl.min(h, axis=N_DIMS - 1 - BIT, keep_dims=True)
    hi = tl.max(h, axis=N_DIMS - 1 - BIT, keep_dims=True)
    return tl.where((_bit(N_DIMS, BIT) ^ flip) != 0, hi, lo)


@triton.jit
def _merge_stage(h, N_DIMS: tl.constexpr, STAGE: tl.constexpr, ALTERNATE: tl.constexpr,
                 DESCENDING: tl.constexpr):
    """Sort every bitonic run of 2**STAGE columns. With ALTERNATE, runs alternate ascending /
    descending (by bit STAGE of the position) so neighbouring runs form the next bitonic run."""
    if ALTERNATE:
        flip = _bit(N_DIMS, STAGE)
    else:
        flip = DESCENDING
    for i in tl.static_range(STAGE):
        h = _compare_swap(h, flip, N_DIMS, STAGE - 1 - i)
    return h


@triton.jit
def _topk_desc(x, LOG_ROWS: tl.constexpr, LOG_M: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K largest of each row of x [2**LOG_ROWS, 2**LOG_M], sorted descending.

    Bitonic top-k: sort runs of 2**LOG_K (alternating directions), then repeatedly take the
    element-wise max of neighbouring runs (one ascending, one descending: the max holds the
    best 2**LOG_K of both and is bitonic) and re-sort it, halving the width each time."""
    n_dims: tl.constexpr = LOG_ROWS + LOG_M
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, LOG_K + 1):
        h = _merge_stage(h, n_dims, i, i < LOG_M, 1)
    for i in tl.static_range(LOG_K + 1, LOG_M + 1):
        # Round i starts with n_dims - (i - LOG_K - 1) axes and drops one (a constexpr cannot
        # be reassigned inside the unrolled loop, so the count is written out).
        h = tl.max(h, axis=n_dims - (i - LOG_K - 1) - 1 - LOG_K)
        h = _merge_stage(h, n_dims - (i - LOG_K), LOG_K, i < LOG_M, 1)
    return tl.reshape(h, [2 ** LOG_ROWS, 2 ** LOG_K])


@triton.jit
def _merge(acc, keys, LOG_ROWS: tl.constexpr, LOG_M: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K best of acc (sorted ascending) and of a tile of keys, sorted ascending."""
    if LOG_K == 0:
        # A one-element "sort" has nothing to merge; a row max does the job.
        return tl.maximum(acc, tl.max(keys, axis=1)[:, None])
    best = _topk_desc(keys, LOG_ROWS, LOG_M, LOG_K)
    # max(ascending, descending) keeps the best of the union and is bitonic: one merge sorts it.
    h = tl.reshape(tl.maximum(acc, best), [2] * (LOG_ROWS + LOG_K))
    h = _merge_stage(h, LOG_ROWS + LOG_K, LOG_K, False, 0)
    return tl.reshape(h, [2 ** LOG_ROWS, 2 ** LOG_K])


@triton.jit
def _store_topk(acc, rows, row_mask, val_ptr, idx_ptr, key_ptr, k, key_stride, key_offset,
                KP: tl.constexpr, CLAMP: tl.constexpr, STORE_KEYS: tl.constexpr):
    slots = tl.arange(0, KP)
    if STORE_KEYS:
        # Split mode: hand the unordered KP best keys to the cross-split merge.
        ptrs = key_ptr + rows[:, None] * key_stride + key_offset + slots[None, :]
        tl.store(ptrs, acc, mask=row_mask[:, None])
    else:
        value, index = _unpack(acc)
        if CLAMP:
            value = tl.maximum(value, 0.0)  # non-dead (-inf) fillers read as 0
        # acc is ascending: slot j holds output rank KP-1-j. Storing it reversed costs nothing,
        # where a descending re-sort would be a full bitonic sort.
        rank = KP - 1 - slots
        mask = row_mask[:, None] & (rank[None, :] < k)
        offs = rows[:, None] * k + rank[None, :]
        tl.store(val_ptr + offs, value.to(val_ptr.dtype.element_ty), mask=mask)
        tl.store(idx_ptr + offs, index, mask=mask)


@triton.jit
def _topk_encode_kernel(
    x_ptr, w_ptr, c_ptr, dead_ptr,
    val_ptr, idx_ptr, aux_val_ptr, aux_idx_ptr, key_ptr, aux_key_ptr,
    n, d_in, d_sae, k, k_aux, cols_per_split, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    KP: tl.constexpr, KAP: tl.constexpr, HAS_AUX: tl.constexpr, STORE_KEYS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    LOG_N: tl.constexpr, LOG_M: tl.constexpr, LOG_KP: tl.constexpr, LOG_KAP: tl.constexpr,
):
    # Launch order: the split index is the slow one, so the programs resident at the same time
    # share one d_sae range and stream the same W tiles through L2 together (W is by far the
    # larger operand: d_sae x d_in vs BLOCK_N x d_in per program).
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(n, BLOCK_N)
    split = pid // num_row_blocks
    row_block = pid % num_row_blocks

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, d_sae)
    ks = tl.arange(0, BLOCK_K)

    # Sentinel below every real key (value -inf, low field 0): padded slots never win.
    floor: tl.constexpr = -2139095041 * 4294967296
    acc = tl.full([BLOCK_N, KP], floor, tl.int64)
    if HAS_AUX:
        aux_acc = tl.full([BLOCK_N, KAP], floor, tl.int64)

    x_rows = x_ptr + rows[:, None].to(tl.int64) * d_in
    for tile_start in range(col_start, col_end, BLOCK_M):
        cols = tile_start + tl.arange(0, BLOCK_M)
        col_mask = cols < col_end
        w_cols = w_ptr + cols[None, :].to(tl.int64) * d_in
        pre = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            kk = k0 + ks
            k_mask = kk < d_in
            xt = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_cols + kk[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            pre = tl.dot(xt, wt, pre, input_precision=INPUT_PRECISION)
        pre += tl.load(c_ptr + cols, mask=col_mask, other=0.0)[None, :]
        # ReLU, then + 0.0 turns a -0.0 into +0.0 so all zeros tie (and compare) as equal.
        r = tl.maximum(pre, 0.0) + 0.0
        # Tail columns (past col_end) get -inf *and* an index >= d_sae, so they rank below
        # every real latent, even the -inf non-dead ones of the aux selection.
        r = tl.where(col_mask[None, :], r, float("-inf"))
        acc = _merge(acc, _pack(r, cols[None, :]), LOG_N, LOG_M, LOG_KP)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_mask, other=0) != 0
            aux_r = tl.where(dead[None, :], r, float("-inf"))
            aux_acc = _merge(aux_acc, _pack(aux_r, cols[None, :]), LOG_N, LOG_M, LOG_KAP)

    _store_topk(acc, rows, row_mask, val_ptr, idx_ptr, key_ptr, k, num_splits * KP, split * KP,
                KP, False, STORE_KEYS)
    if HAS_AUX:
        _store_topk(aux_acc, rows, row_mask, aux_val_ptr, aux_idx_ptr, aux_key_ptr, k_aux,
                    num_splits * KAP, split * KAP, KAP, True, STORE_KEYS)


_topk_encode_tuned = triton.autotune(
    configs=_TUNE_CONFIGS, key=["d_in", "d_sae", "KP", "KAP", "BLOCK_N", "BLOCK_M", "HAS_AUX", "STORE_KEYS"],
)(_topk_encode_kernel)


def _unpack_torch(keys: torch.Tensor):
    """Host-side inverse of ``_pack`` for the cross-split merge."""
    bits = (keys >> 32).to(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.view(torch.float32), _INDEX_MAX - (keys & _INDEX_MAX)


def _merge_splits(keys: torch.Tensor, k: int, dtype: torch.dtype, clamp: bool):
    # Keys are unique, so torch.topk's unspecified tie order cannot matter here.
    best = torch.topk(keys, k, dim=1, sorted=True).values
    values, indices = _unpack_torch(best)
    if clamp:
        values = values.clamp_min(0.0)
    return values.to(dtype), indices


def _folded_bias(W, b, b_dec):
    """``b - W b_dec`` in fp32, a few thousand rows of W at a time so no fp32 copy of W exists."""
    c = b.to(torch.float32)
    if b_dec is None:
        return c.contiguous()
    bd = b_dec.to(torch.float32)
    if W.dtype == torch.float32:
        return c - torch.mv(W, bd)
    c = c.clone()
    step = max(1, (1 << 24) // max(1, W.shape[1]))
    for start in range(0, W.shape[0], step):
        c[start:start + step] -= torch.mv(W[start:start + step].to(torch.float32), bd)
    return c


def _check_tensor(name, t, ndim, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of x), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")


def _check_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def _validate(x, W, b, b_dec, k, dead_mask, k_aux):
    _check_tensor("x", x, 2, None, None)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    dev = x.device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"x must be a CUDA tensor (got device {dev}); CPU tensors run only under TRITON_INTERPRET=1")
    _check_tensor("W", W, 2, x.dtype, dev)
    n, d_in = x.shape
    d_sae = W.shape[0]
    if W.shape[1] != d_in:
        raise ValueError(f"W must have shape [d_sae, {d_in}] (d_in of x), got {tuple(W.shape)}")
    if not 1 <= d_sae < _MAX_D_SAE:
        raise ValueError(f"W must have between 1 and {_MAX_D_SAE - 1} rows (d_sae), got {d_sae}")
    _check_tensor("b", b, 1, x.dtype, dev)
    if b.shape[0] != d_sae:
        raise ValueError(f"b must have shape [{d_sae}] (d_sae), got {tuple(b.shape)}")
    if b_dec is not None:
        _check_tensor("b_dec", b_dec, 1, x.dtype, dev)
        if b_dec.shape[0] != d_in:
            raise ValueError(f"b_dec must have shape [{d_in}] (d_in), got {tuple(b_dec.shape)}")
    _check_int("k", k)
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must satisfy 1 <= k <= d_sae = {d_sae}, got {k}")
    _check_int("k_aux", k_aux)
    if not 0 <= k_aux <= d_sae:
        raise ValueError(f"k_aux must satisfy 0 <= k_aux <= d_sae = {d_sae}, got {k_aux}")
    if dead_mask is not None:
        _check_tensor("dead_mask", dead_mask, 1, torch.bool, dev)
        if dead_mask.shape[0] != d_sae:
            raise ValueError(f"dead_mask must have shape [{d_sae}] (d_sae), got {tuple(dead_mask.shape)}")
    # Checked last, so a wrong shape is reported as such rather than as a stride problem.
    for name, t in (("x", x), ("W", W), ("b", b), ("b_dec", b_dec), ("dead_mask", dead_mask)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")


def _log2(v: int) -> int:
    return v.bit_length() - 1


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _blocks(kp: int, kap: int, d_sae: int, on_gpu: bool):
    """(BLOCK_N, BLOCK_M) for a running top-KP (and top-KAP)."""
    widest = max(kp, kap)
    if not on_gpu:
        # The interpreter pays per tensor op far more than per element: few, wide tiles.
        return 32, max(widest, min(128, _next_pow2(d_sae)))
    # The tile must be at least KP wide for the top-k, and the running top-k lives in registers:
    # fewer rows per program as k grows (shapes checked for spills, see _DEFAULT_CONFIG).
    if widest <= 32:
        return 64, 128
    if widest == 64:
        return 64, 64
    if widest == 128:
        return 32, 128
    return 16, widest


def _launch(x, W, b, b_dec, k, dead_mask, k_aux, num_splits=None, blocks=None):
    n, d_in = x.shape
    d_sae = W.shape[0]
    has_aux = dead_mask is not None and k_aux > 0
    kp = _next_pow2(k)
    kap = _next_pow2(k_aux) if has_aux else 1
    block_n, block_m = blocks if blocks is not None else _blocks(kp, kap, d_sae, x.is_cuda)
    if block_m < max(kp, kap):
        raise ValueError(f"BLOCK_M ({block_m}) must be >= the padded k ({max(kp, kap)})")

    row_blocks = triton.cdiv(n, block_n)
    col_tiles = triton.cdiv(d_sae, block_m)
    if num_splits is None:
        num_splits = 1
        if x.is_cuda:
            # Too few row blocks to fill the GPU: split d_sae too (about two programs per SM).
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            if row_blocks < sms:
                num_splits = min(col_tiles, triton.cdiv(2 * sms, row_blocks))
    num_splits = max(1, min(num_splits, col_tiles))
    cols_per_split = triton.cdiv(col_tiles, num_splits) * block_m
    num_splits = triton.cdiv(d_sae, cols_per_split)  # no empty split
    store_keys = num_splits > 1

    c = _folded_bias(W, b, b_dec)
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    aux_values = torch.empty(n, k_aux if has_aux else 0, dtype=x.dtype, device=x.device)
    aux_indices = torch.empty(n, k_aux if has_aux else 0, dtype=torch.int64, device=x.device)
    keys = aux_keys = values  # placeholders: never dereferenced unless STORE_KEYS
    if store_keys:
        keys = torch.empty(n, num_splits * kp, dtype=torch.int64, device=x.device)
        if has_aux:
            aux_keys = torch.empty(n, num_splits * kap, dtype=torch.int64, device=x.device)
    dead = dead_mask.view(torch.uint8) if has_aux else c  # placeholder when unused
    # torch's fp32 matmul is full precision unless the user allows TF32; do the same.
    precision = "tf32" if (x.dtype == torch.float32 and x.is_cuda
                           and torch.backends.cuda.matmul.allow_tf32) else "ieee"

    grid = (row_blocks * num_splits,)
    if not x.is_cuda:
        kernel, launch_cfg = _topk_encode_kernel, dict(BLOCK_K=16)
    elif n * d_sae * max(d_in, 1) >= _TUNE_MIN_MACS:
        kernel, launch_cfg = _topk_encode_tuned, {}
    else:
        kernel, launch_cfg = _topk_encode_kernel, _DEFAULT_CONFIG
    kernel[grid](
        x, W, c, dead,
        values, indices, aux_values, aux_indices, keys, aux_keys,
        n, d_in, d_sae, k, k_aux, cols_per_split, num_splits,
        BLOCK_N=block_n, BLOCK_M=block_m, KP=kp, KAP=kap,
        HAS_AUX=has_aux, STORE_KEYS=store_keys, INPUT_PRECISION=precision,
        LOG_N=_log2(block_n), LOG_M=_log2(block_m), LOG_KP=_log2(kp), LOG_KAP=_log2(kap), **launch_cfg,
    )
    if store_keys:
        values, indices = _merge_splits(keys, k, x.dtype, clamp=False)
        if has_aux:
            aux_values, aux_indices = _merge_splits(aux_keys, k_aux, x.dtype, clamp=True)
    if not has_aux:
        # Same as the torch backend: without a dead mask the aux code is all zeros.
        aux_values = torch.zeros(n, k_aux, dtype=x.dtype, device=x.device)
        aux_indices = torch.zeros(n, k_aux, dtype=torch.int64, device=x.device)
    return values, indices, aux_values, aux_indices


def topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0):
    """Fused ``top-k(relu((x - b_dec) W^T + b))``; see the module docstring and
    ``fastsae.torch_backend.topk_encode`` for the contract."""
    _validate(x, W, b, b_dec, k, dead_mask, k_aux)
    n = x.shape[0]
    if n == 0:
        empty = torch.empty(0, k, dtype=x.dtype, device=x.device)
        return (empty, torch.empty(0, k, dtype=torch.int64, device=x.device),
                torch.empty(0, k_aux, dtype=x.dtype, device=x.device),
                torch.empty(0, k_aux, dtype=torch.int64, device=x.device))
    return _launch(x, W, b, b_dec, k, dead_mask, k_aux)
