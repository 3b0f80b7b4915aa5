"""Sparse matmuls over a latent code: gather, gather-dot and scatter-add, for both code forms.

The launchers have the signatures of the same-named functions in ``fastsae.torch_backend``
(see its docstring for the contract). A fixed-k code ``(values[N, k], indices[N, k])`` is run
by the same kernels as a CSR code: row ``n`` of it is the CSR row ``[n*k, (n+1)*k)``. The
``IS_CSR`` switch is a compile-time constant, so the fixed-k form pays nothing for sharing:
its row bounds are arithmetic instead of two loads, and ``K`` is known to the compiler.

Every kernel accumulates in float32 and casts only when storing. ``scatter_add`` is
deterministic: the launcher groups entries by latent with a stable sort, and each program
reduces one latent's entries in a fixed order, with no atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["csr_gather", "csr_gather_dot", "csr_scatter_add", "gather", "gather_dot", "scatter_add"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)


# Triton decides at decoration time whether @triton.jit functions are interpreted, so what
# matters is the environment this module was imported under, not the current one.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreting() -> bool:
    """Whether this module's kernels run under the Triton interpreter (CPU tensors)."""
    return _INTERPRET


# Index values can only be range-checked by reading them; on a GPU that is a host sync per
# call, which the training and hooked-inference hot paths cannot afford. Indices there come
# from the encode kernels. CPU tensors (the interpreter) are always checked, and the
# environment variable turns the check on everywhere for debugging.
_CHECK_INDEX_VALUES = os.environ.get("FASTSAE_CHECK_INDICES", "0") not in ("", "0")


def _autotune(cuda_configs, fallback, key):
    """Autotune over ``cuda_configs`` on a GPU; a single config otherwise.

    Autotuning with more than one config fails without a GPU, and the interpreter's timings
    would mean nothing anyway.
    """
    configs = cuda_configs if torch.cuda.is_available() and not _INTERPRET else [fallback]
    return triton.autotune(configs=configs, key=key)


def _cfg(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------
# Argument checks. tl.device_assert does nothing in the interpreter and a bad index on a
# GPU is a memory fault, so everything that can be checked without a host sync is checked
# here, with the argument named.
# --------------------------------------------------------------------------------------


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _float(name, t, dtype=None):
    _tensor(name, t)
    if dtype is None:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of the other float inputs), got {t.dtype}")


def _index(name, t):
    _tensor(name, t)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")


def _ndim(name, t, ndim, what):
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")


def _shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it)")


def _row_major(name, t):
    # Matrices may have any row stride (a slice of a larger weight), but each row must be
    # dense so a tile of it is one coalesced load.
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")


def _same_device(**tensors):
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all arguments must be on one device")
    if first.device.type == "cuda":
        return
    if first.device.type == "cpu" and _interpreting():
        return
    raise ValueError(f"Triton kernels need CUDA tensors, got {first_name} on {first.device} "
                     "(CPU tensors work only under TRITON_INTERPRET=1, set before importing triton)")


def _num_rows(num_rows):
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")


def _index_values(name, indices, num_rows):
    if indices.numel() == 0 or not (indices.device.type == "cpu" or _CHECK_INDEX_VALUES):
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_rows:
        raise ValueError(f"{name} must lie in [0, {num_rows}), got values in [{lo}, {hi}]")


def _offsets(row_offsets, n_rows, nnz):
    """Check a CSR row_offsets of n_rows + 1 entries (n_rows=None: any length)."""
    _index("row_offsets", row_offsets)
    _ndim("row_offsets", row_offsets, 1, "(one offset per row plus one)")
    _contiguous("row_offsets", row_offsets)
    if row_offsets.numel() == 0:
        raise ValueError("row_offsets must have N + 1 >= 1 entries, got an empty tensor")
    if n_rows is not None and row_offsets.numel() != n_rows + 1:
        raise ValueError(f"row_offsets must have shape ({n_rows + 1},) (one more than the rows of g), "
                         f"got {tuple(row_offsets.shape)}")
    if row_offsets.device.type == "cpu" or _CHECK_INDEX_VALUES:
        first, last = int(row_offsets[0]), int(row_offsets[-1])
        if first != 0 or last != nnz:
            raise ValueError(f"row_offsets must start at 0 and end at nnz={nnz}, got {first} and {last}")
        if row_offsets.numel() > 1 and bool((row_offsets[1:] < row_offsets[:-1]).any()):
            raise ValueError("row_offsets must be non-decreasing")


def _check_weight(name, W, dtype=None):
    _float(name, W, dtype)
    _ndim(name, W, 2, "(one row per latent)")
    _row_major(name, W)


def _check_code(values, indices, W, csr):
    """Checks shared by the gather launchers; returns nothing, raises on bad input."""
    _check_weight("W", W)
    _float("values", values, W.dtype)
    _index("indices", indices)
    if csr:
        _ndim("indices", indices, 1, "(one latent per stored entry)")
    else:
        _ndim("indices", indices, 2, "([N, k])")
    _shape("values", values, indices.shape)
    _contiguous("values", values)
    _contiguous("indices", indices)


def _check_bias(bias, W):
    if bias is None:
        return
    _float("bias", bias, W.dtype)
    _shape("bias", bias, (W.shape[1],))
    _contiguous("bias", bias)


# --------------------------------------------------------------------------------------
# gather: out[n] = sum_j v[n,j] W[i[n,j]] (+ bias)
# --------------------------------------------------------------------------------------


# The configs a GPU autotunes over (bench/gpu_static.py compiles each for sm_90).
GATHER_CONFIGS = [_cfg(BLOCK_D=bd, BLOCK_K=bk, num_warps=w) for bd, bk, w in
     ((128, 16, 4), (256, 16, 4), (256, 32, 8), (512, 8, 8))]


@_autotune(
    GATHER_CONFIGS,
    _cfg(BLOCK_D=64, BLOCK_K=16),
    key=["d", "K", "IS_CSR"],
)
@triton.jit
def _gather_kernel(values_ptr, indices_ptr, offsets_ptr, w_ptr, bias_ptr, out_ptr,
                   d, stride_w, stride_out,
                   K: tl.constexpr, IS_CSR: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    if IS_CSR:
        start = tl.load(offsets_ptr + row).to(tl.int64)
        end = tl.load(offsets_ptr + row + 1).to(tl.int64)
    else:
        start = row * K
        end = start + K
    # A 2-D accumulator defers the cross-lane reduction to one tl.sum at the end instead of
    # one per chunk of entries.
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < end
        lat = tl.load(indices_ptr + j, mask=j_ok, other=0).to(tl.int64)
        v = tl.load(values_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_w + cols[None, :],
                    mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += v[:, None] * w
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def _launch_gather(values, indices, offsets, W, bias, n_rows, k, csr):
    d = W.shape[1]
    out = torch.empty(n_rows, d, dtype=W.dtype, device=W.device)
    if out.numel() == 0:
        return out
    # Unused pointer arguments still need a tensor; the constexpr flags keep them unread.
    offsets = indices if offsets is None else offsets
    bias_arg = W if bias is None else bias

    def grid(meta):
        return (n_rows, triton.cdiv(d, meta["BLOCK_D"]))

    _gather_kernel[grid](values, indices, offsets, W, bias_arg, out, d, W.stride(0), out.stride(0),
                         K=k, IS_CSR=csr, HAS_BIAS=bias is not None)
    return out


def gather(values, indices, W, bias=None):
    """``out[n] = sum_j values[n,j] * W[indices[n,j]] (+ bias)``, shape ``[N, d]``."""
    _check_code(values, indices, W, csr=False)
    _check_bias(bias, W)
    _same_device(W=W, values=values, indices=indices, bias=bias)
    _index_values("indices", indices, W.shape[0])
    n, k = indices.shape
    return _launch_gather(values, indices, None, W, bias, n, k, csr=False)


def csr_gather(values, indices, row_offsets, W, bias=None):
    """``gather`` for a CSR code; ``N = len(row_offsets) - 1``, empty rows give ``bias`` (or 0)."""
    _check_code(values, indices, W, csr=True)
    _check_bias(bias, W)
    _offsets(row_offsets, None, indices.numel())
    _same_device(W=W, values=values, indices=indices, row_offsets=row_offsets, bias=bias)
    _index_values("indices", indices, W.shape[0])
    return _launch_gather(values, indices, row_offsets, W, bias, row_offsets.numel() - 1, 0, csr=True)


# --------------------------------------------------------------------------------------
# gather_dot: out[n,j] = <g[n], W[i[n,j]]>
# --------------------------------------------------------------------------------------


# The configs a GPU autotunes over (bench/gpu_static.py compiles each for sm_90).
GATHER_DOT_CONFIGS = [_cfg(BLOCK_D=bd, BLOCK_K=bk, num_warps=w) for bd, bk, w in
     ((128, 16, 4), (128, 32, 4), (256, 16, 8), (64, 64, 4))]


@_autotune(
    GATHER_DOT_CONFIGS,
    _cfg(BLOCK_D=64, BLOCK_K=16),
    key=["d", "K", "IS_CSR"],
)
@triton.jit
def _gather_dot_kernel(g_ptr, indices_ptr, offsets_ptr, w_ptr, out_ptr,
                       d, stride_g, stride_w,
                       K: tl.constexpr, IS_CSR: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per row of g: every entry of the row reads the same g tile, so it is
    # loaded once per chunk of entries rather than once per entry.
    row = tl.program_id(0).to(tl.int64)
    if IS_CSR:
        start = tl.load(offsets_ptr + row).to(tl.int64)
        end = tl.load(offsets_ptr + row + 1).to(tl.int64)
    else:
        start = row * K
        end = start + K
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < end
        lat = tl.load(indices_ptr + j, mask=j_ok, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            gv = tl.load(g_ptr + row * stride_g + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + lat[:, None] * stride_w + cols[None, :],
                        mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += w * gv[None, :]
        tl.store(out_ptr + j, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=j_ok)


def _launch_gather_dot(g, indices, offsets, W, n_rows, k, csr):
    out = torch.empty(indices.shape, dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    offsets = indices if offsets is None else offsets
    _gather_dot_kernel[(n_rows,)](g, indices, offsets, W, out, W.shape[1], g.stride(0), W.stride(0),
                                  K=k, IS_CSR=csr)
    return out


def _check_g(g, W):
    _float("g", g, W.dtype)
    _ndim("g", g, 2, "([N, d])")
    _row_major("g", g)
    if g.shape[1] != W.shape[1]:
        raise ValueError(f"g must have shape (N, {W.shape[1]}) to match W's rows, got {tuple(g.shape)}")


def _check_indices(indices, csr):
    _index("indices", indices)
    _ndim("indices", indices, 1 if csr else 2, "(one latent per stored entry)" if csr else "([N, k])")
    _contiguous("indices", indices)


def gather_dot(g, indices, W):
    """``out[n,j] = <g[n], W[indices[n,j]]>``, shape ``[N, k]``."""
    _check_weight("W", W)
    _check_g(g, W)
    _check_indices(indices, csr=False)
    if indices.shape[0] != g.shape[0]:
        raise ValueError(f"indices must have shape ({g.shape[0]}, k) to match g, got {tuple(indices.shape)}")
    _same_device(g=g, indices=indices, W=W)
    _index_values("indices", indices, W.shape[0])
    n, k = indices.shape
    return _launch_gather_dot(g, indices, None, W, n, k, csr=False)


def csr_gather_dot(g, indices, row_offsets, W):
    """``gather_dot`` for a CSR code, shape ``[nnz]``."""
    _check_weight("W", W)
    _check_g(g, W)
    _check_indices(indices, csr=True)
    _offsets(row_offsets, g.shape[0], indices.numel())
    _same_device(g=g, indices=indices, row_offsets=row_offsets, W=W)
    _index_values("indices", indices, W.shape[0])
    return _launch_gather_dot(g, indices, row_offsets, W, g.shape[0], 0, csr=True)


# --------------------------------------------------------------------------------------
# scatter_add: out[m] = sum over (n,j) with i[n,j] = m of v[n,j] g[n]
# --------------------------------------------------------------------------------------


# The configs a GPU autotunes over (bench/gpu_static.py compiles each for sm_90).
# (256, 16, 8) spilled 8 bytes per thread in fp32 (gpu_static) and is left out.
SCATTER_CONFIGS = [_cfg(BLOCK_D=bd, BLOCK_K=bk, num_warps=w) for bd, bk, w in
     ((128, 8, 4), (256, 8, 4), (512, 8, 8))]


# A latent with more entries than this is reduced by several programs, SCATTER_CHUNK entries
# each, then summed in a second pass: one popular latent (16k entries at N 16384) would
# otherwise be a single program's serial loop, a tail all other programs wait for.
SCATTER_CHUNK = 1024


@_autotune(
    SCATTER_CONFIGS,
    _cfg(BLOCK_D=64, BLOCK_K=16),
    key=["d"],
)
@triton.jit
def _scatter_kernel(values_ptr, rows_ptr, latent_offsets_ptr, prog_latent_ptr, prog_first_ptr, slot_ptr,
                    g_ptr, out_ptr, partial_ptr, num_latents, d, stride_g, stride_out,
                    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # The entries of latent m sit at [latent_offsets[m], latent_offsets[m+1]) of the
    # latent-sorted arrays: a CSC view of the code. Program p reduces piece p - first[m] of
    # its latent m (CHUNK entries): a latent of one piece is stored to out[m] outright (no
    # float atomics, a fixed sum order); a piece of a longer one goes to its partial slot.
    p = tl.program_id(0).to(tl.int64)
    lat = tl.load(prog_latent_ptr + p).to(tl.int64)
    if lat < num_latents:
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        first = tl.load(prog_first_ptr + lat)
        lat_start = tl.load(latent_offsets_ptr + lat)
        lat_end = tl.load(latent_offsets_ptr + lat + 1)
        start = lat_start + (p - first) * CHUNK
        end = tl.minimum(lat_end, start + CHUNK)
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            j_ok = j < end
            r = tl.load(rows_ptr + j, mask=j_ok, other=0)
            v = tl.load(values_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + r[:, None] * stride_g + cols[None, :],
                         mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += v[:, None] * gv
        total = tl.sum(acc, axis=0)
        if lat_end - lat_start <= CHUNK:
            tl.store(out_ptr + lat * stride_out + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
        else:
            slot = tl.load(slot_ptr + p).to(tl.int64)
            tl.store(partial_ptr + slot * d + cols, total, mask=col_ok)


@_autotune(
    SCATTER_CONFIGS,
    _cfg(BLOCK_D=64, BLOCK_K=16),
    key=["d"],
)
@triton.jit
def _scatter_combine_kernel(long_latents_ptr, latent_offsets_ptr, first_slot_ptr, partial_ptr, out_ptr,
                            num_latents, d, stride_out,
                            CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program q sums, in piece order, the partials of the q-th latent of more than one piece.
    lat = tl.load(long_latents_ptr + tl.program_id(0)).to(tl.int64)
    if lat < num_latents:
        count = tl.load(latent_offsets_ptr + lat + 1) - tl.load(latent_offsets_ptr + lat)
        if count > CHUNK:
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            first = tl.load(first_slot_ptr + lat).to(tl.int64)
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for s in range(0, tl.cdiv(count, CHUNK)):
                acc += tl.load(partial_ptr + (first + s) * d + cols, mask=col_ok, other=0.0)
            tl.store(out_ptr + lat * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


class _Grouping:
    """A code's entries grouped by latent, and the pieces the scatter kernel splits them into;
    all device arrays, sized from shapes alone (no host read)."""

    def __init__(self, latents, num_rows, k, row_ids, chunk):
        nnz, device = latents.numel(), latents.device
        # A stable sort keeps each latent's entries in (row, slot) order, so the reduction order
        # (and the result, bit for bit) depends only on the code, not on the sort's scheduling.
        sorted_latents, self.order = torch.sort(latents, stable=True)
        self.rows = self.order // k if row_ids is None else row_ids[self.order]
        # searchsorted instead of bincount: bincount on CUDA reads the maximum back to the host.
        bounds = torch.arange(num_rows + 1, device=device, dtype=sorted_latents.dtype)
        self.latent_offsets = torch.searchsorted(sorted_latents, bounds)
        counts = self.latent_offsets[1:] - self.latent_offsets[:-1]
        pieces = torch.clamp((counts + chunk - 1) // chunk, min=1)  # an empty latent: one piece of zeros
        ends = torch.cumsum(pieces, 0)
        self.prog_first = ends - pieces
        # At most num_rows + nnz / chunk pieces: the grid, whatever the code; the programs past
        # the last piece find latent num_rows and return.
        self.programs = num_rows + triton.cdiv(nnz, chunk)
        self.prog_latent = torch.searchsorted(ends, torch.arange(self.programs, device=device), right=True)
        long = pieces > 1
        in_long = long[self.prog_latent.clamp(max=num_rows - 1)] & (self.prog_latent < num_rows)
        self.slot = torch.cumsum(in_long, 0) - 1  # consecutive per latent, in piece order
        self.first_slot = self.slot[self.prog_first.clamp(max=self.programs - 1)]
        # Latents of several pieces have over `chunk` entries each: at most nnz / chunk of them
        # (and at most all of them), and their pieces at most 2 nnz / chunk.
        self.long_count = max(1, min(num_rows, triton.cdiv(nnz, chunk)))
        self.long_latents = torch.argsort((~long).to(torch.int8), stable=True)[:self.long_count]
        self.partial_rows = 2 * triton.cdiv(nnz, chunk)
        self._key = None


# The last grouping and the index tensor it came from: a train step scatters along one code's
# indices three times (the decoder's weight gradient, the encoder's, and its bias's), so they
# are sorted once. Reused only for the same storage at the same version (a live reference is
# kept, so the memory cannot be reused by another tensor meanwhile).
_last_grouping: tuple | None = None


def _grouping(latents, num_rows, k, row_ids, chunk) -> _Grouping:
    global _last_grouping
    key = (latents.data_ptr(), latents.shape, latents.stride(), latents.dtype, latents.device, latents._version,
           num_rows, k, None if row_ids is None else (row_ids.data_ptr(), row_ids._version), chunk)
    if _last_grouping is not None and _last_grouping[0] == key:
        return _last_grouping[2]
    grouping = _Grouping(latents, num_rows, k, row_ids, chunk)
    _last_grouping = (key, (latents, row_ids), grouping)
    return grouping


def _launch_scatter(values, latents, g, num_rows, k=None, row_ids=None):
    """Group the flat entries by latent, then reduce per latent (long latents in pieces).

    The row of flat entry e is ``e // k`` for a fixed-k code, ``row_ids[e]`` for CSR.
    """
    d = g.shape[1]
    out = torch.empty(num_rows, d, dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    chunk = SCATTER_CHUNK
    grouping = _grouping(latents, num_rows, k, row_ids, chunk)
    values = values[grouping.order]
    partial = torch.empty(grouping.partial_rows, d, dtype=torch.float32, device=g.device)

    def grid(meta):
        return (grouping.programs, triton.cdiv(d, meta["BLOCK_D"]))

    _scatter_kernel[grid](values, grouping.rows, grouping.latent_offsets, grouping.prog_latent,
                          grouping.prog_first, grouping.slot, g, out, partial, num_rows, d, g.stride(0),
                          out.stride(0), CHUNK=chunk)

    def combine_grid(meta):
        return (grouping.long_count, triton.cdiv(d, meta["BLOCK_D"]))

    _scatter_combine_kernel[combine_grid](grouping.long_latents, grouping.latent_offsets, grouping.first_slot,
                                          partial, out, num_rows, d, out.stride(0), CHUNK=chunk)
    return out


def _check_scatter(values, indices, g, csr):
    _float("g", g)
    _ndim("g", g, 2, "([N, d])")
    _row_major("g", g)
    _float("values", values, g.dtype)
    _check_indices(indices, csr)
    _shape("values", values, indices.shape)
    _contiguous("values", values)


def scatter_add(values, indices, g, num_rows):
    """``out[m] = sum over (n,j) with indices[n,j] = m of values[n,j] * g[n]``, shape ``[num_rows, d]``.

    Deterministic: the same inputs give bitwise the same output on every run.
    """
    _check_scatter(values, indices, g, csr=False)
    _num_rows(num_rows)
    if indices.shape[0] != g.shape[0]:
        raise ValueError(f"indices must have shape ({g.shape[0]}, k) to match g, got {tuple(indices.shape)}")
    _same_device(g=g, values=values, indices=indices)
    _index_values("indices", indices, num_rows)
    return _launch_scatter(values.reshape(-1), indices.reshape(-1), g, num_rows, k=indices.shape[1])


def csr_scatter_add(values, indices, row_offsets, g, num_rows):
    """``scatter_add`` for a CSR code; deterministic."""
    _check_scatter(values, indices, g, csr=True)
    _num_rows(num_rows)
    _offsets(row_offsets, g.shape[0], indices.numel())
    _same_device(g=g, values=values, indices=indices, row_offsets=row_offsets)
    _index_values("indices", indices, num_rows)
    counts = row_offsets[1:] - row_offsets[:-1]
    row_ids = torch.repeat_interleave(torch.arange(g.shape[0], device=g.device), counts,
                                      output_size=indices.numel())
    return _launch_scatter(values, indices, g, num_rows, row_ids=row_ids)
