"""Exact top-k by cutoff: select from low-precision pre-activations, rescore the few survivors.

The CPU TopK encoder runs its big GEMM in bfloat16 and still returns exactly the float32
answer (values and indices, tie rule included). The argument, for one row of
``pre = relu(xc W^T + b)`` (xc = x - b_dec, computed in fp32 as the reference does):

* The GEMM reads bf16 copies ``xc = xh + xl``, ``W = Wh + Wl``, ``b = bh + bl`` (the low parts
  are the rounding errors, known exactly), accumulates in fp32 and rounds the output ``s``
  to bf16: ``p = bf16(s)``. Cauchy-Schwarz bounds everything but the output rounding by one
  number per row, ``e`` (``input_error``); the output rounding is relative: ``|p - s| <= u|s|``.
* ``c`` is the k-th largest of the maxima of disjoint groups of latents (``cutoffs``): k
  distinct entries with ``p >= c``, so exact values ``>= c / (1 + u) - e``, and the true k-th
  largest value t is at least that. Where that decides nothing (below), ``c`` is the row's
  own k-th largest ``p`` (``row_cutoffs``), the best such bound, at the price of a top-k over
  the row: a trained encoder's negative biases leave each row's positive entries in fewer
  and fewer groups, so that the k-th group maximum falls to about 0.
* A true top-k member m has ``pre[m] >= t``, so ``p[m] >= (1 - u) (c / (1 + u) - 2e)``: the
  cut. Keeping every entry with ``p >= cut`` keeps all top-k members and every entry tied
  with t; their exact top-k, rescored in fp32, is the answer.
* ``e`` includes the fp32 rescoring's own rounding, so the bound covers the values returned.
* Underflow is bounded too: the norms are upper bounds even where float32 squares underflow
  (``norm_bound``), and ``e`` covers subnormals flushed to zero (``flush_error``), which the
  bf16 dot-product instructions (AVX512-BF16, AMX) do to their inputs and results.
* A row whose cut is still not positive (ReLU zeros could decide its tail) or whose
  survivors are still too many is the caller's to decide exactly (fastsae.torch_backend:
  every entry that could be positive, from a GEMM without ReLU; else the fp32 GEMM).

The survivors are about k plus the entries within the margin of the k-th value (benchmarks
report them as ``candidates_per_row``). The runtime's one-row product (a steering decode
step) from a float16 copy of the encoder rests on the same argument with float16's rounding
and an fp32 bias add (``fp16_product_error``, ``fp16_row_cut``).
"""
from __future__ import annotations

import math

import torch

from fastsae import buffers

# Unit roundoffs (half an ulp at 1.0) of bfloat16 and float32.
BF16_UNIT = 2.0 ** -8
FP32_UNIT = 2.0 ** -24
FP16_UNIT = 2.0 ** -11
# float16's largest rounding error below its normal range (half the subnormal spacing).
FP16_TINY = 2.0 ** -25
# float32's least normal number: what a flush of a subnormal to zero moves a value by, at most.
FP32_TINY = 2.0 ** -126

# Latents per group for the group maxima: a multiple of 64 keeps the max-reduction
# vectorised on CPU (3-4x faster than 48- or 32-wide groups, measured).
GROUP = 64


class RoundingResiduals:
    """What ``input_error`` needs of an encoder rounded to a lower precision (W = Wh + Wl,
    b = bh + bl): the maxima over latents of ||Wh_m||, ||Wl_m|| and |bl_m|."""

    def __init__(self, wh_max: float, wl_max: float, bl_max: float):
        self.wh_max, self.wl_max, self.bl_max = wh_max, wl_max, bl_max
        # A NaN or Inf weight gives no bound: such an encoder takes the fp32 path whole.
        self.finite = all(math.isfinite(v) for v in (wh_max, wl_max, bl_max))


# Rows per block of rounded_encoder: a block's fp32 temporaries stay in cache (at d_sae 24576,
# d_in 768 the whole-matrix residuals took 74 ms, 512-row blocks 13 ms; 2-core AMD EPYC).
ROUNDING_ROWS = 512


def norm_bound(v):
    """Per row of a float32 matrix: an upper bound on the exact 2-norm (up to the 1% its callers
    add for rounding). float32 loses the squares below FP32_TINY to underflow (rows of 1e-24s
    have norm 0), d of them at most, so sqrt(d * FP32_TINY) is added to the float32 norm."""
    return v.norm(dim=1) + math.sqrt(v.shape[1] * FP32_TINY)


def flush_error(d: int, x_norm, w_norm):
    """A bound on how far flushing subnormals to zero moves a dot product of d terms plus a
    bias (``x_norm``, ``w_norm``: its operands' norms): a flushed input entry is under
    FP32_TINY, so the flushed entries of one side move the sum by under sqrt(d) FP32_TINY
    times the other side's norm, and the bias, each product, each partial sum and the output by
    under FP32_TINY each."""
    return math.sqrt(d) * FP32_TINY * (x_norm + w_norm) + (2 * d + 4) * FP32_TINY


def rounded_encoder(W, b, dtype, round_bias: bool = True):
    """(W rounded to ``dtype``, b rounded to it too or, with ``round_bias`` False, kept as it
    is (added in fp32: no residual), their RoundingResiduals). Each block of rows is rounded and
    measured while it is in cache, so W is read from memory once (at d_sae 24576, d_in 768:
    21 vs 38 ms with the rounding and the measuring apart; 2-core AMD EPYC)."""
    W, b = W.detach(), b.detach()
    low = buffers.empty(W.shape, dtype, W.device)  # a large copy goes where last step's gradients were
    wh, wl = [torch.zeros((), device=W.device)], [torch.zeros((), device=W.device)]
    for start in range(0, W.shape[0], ROUNDING_ROWS):
        block = W[start:start + ROUNDING_ROWS].float()
        high = low[start:start + ROUNDING_ROWS].copy_(block).float()
        wh.append(norm_bound(high).max())
        wl.append(norm_bound(block - high).max())
    b_low = b.to(dtype) if round_bias else b
    bl_max = float((b.float() - b_low.float()).abs().max()) if b.numel() and round_bias else 0.0
    return low, b_low, RoundingResiduals(float(torch.stack(wh).max()), float(torch.stack(wl).max()), bl_max)


def input_error(xc, xc_bf16, res: RoundingResiduals):
    """Per row: a bound on |s - pre| for every latent (input rounding, fp32 accumulation of
    d_in + 1 terms in any order, subnormals flushed) plus the fp32 rescoring's distance from
    the reference (its own flushes included, for a process that flushes subnormals:
    ``torch.set_flush_denormal``)."""
    d = xc.shape[1]
    xh = xc_bf16.float()
    xh_norm = norm_bound(xh)
    xl_norm = norm_bound(xc - xh)
    gamma = 1.01 * (d + 2) * FP32_UNIT
    rounding = xl_norm * res.wh_max + xh_norm * res.wl_max + xl_norm * res.wl_max + res.bl_max
    accumulation = 2 * gamma * (xh_norm + xl_norm) * (res.wh_max + res.wl_max)
    flushes = 2 * flush_error(d, xh_norm + xl_norm, res.wh_max + res.wl_max)
    return 1.01 * (rounding + accumulation + flushes)  # 1% for the norms' own rounding


def group_maxima(pre, size=GROUP):
    """[n, ceil(d_sae / size)] maxima of consecutive groups of ``size`` latents."""
    n, m = pre.shape
    whole = (m // size) * size
    parts = [pre[:, :whole].reshape(n, m // size, size).amax(-1)] if whole else []
    if whole < m:
        parts.append(pre[:, whole:].amax(-1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def usable(d_sae: int, k: int) -> bool:
    """Whether there are enough groups for the cutoff to be informative (>= 2k)."""
    return -(-d_sae // GROUP) >= 2 * k


def bf16_bits(p):
    """The int16 view of a ReLU'd bfloat16 tensor: a value >= 0 orders as its bit pattern does
    (-0.0 views as the least int16), so maxima and comparisons run on integers, with no float32
    copy of the GEMM's output."""
    return p.view(torch.int16)


def bits_to_float(bits):
    """float32 values of bfloat16 bit patterns (int16)."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def bf16_ceil_bits(values):
    """int16 bit pattern of the least bfloat16 >= each float32 in ``values`` (> 0 or +inf):
    for a bf16 p >= 0, ``p >= v`` exactly when ``bits(p) >= bf16_ceil_bits(v)``."""
    return ((values.view(torch.int32) + 0xFFFF) >> 16).to(torch.int16)


# A cut in bits that no ReLU'd bf16 value reaches (0x7FFF is a NaN pattern; oneDNN's ReLU
# maps NaN to 0).
NO_BITS_SURVIVE = torch.iinfo(torch.int16).max


def cutoffs(bits, k, e):
    """(cut[n] as float32, group maxima as bits) for the ReLU'd bf16 GEMM output viewed by
    ``bf16_bits``: keep entries >= cut (see the module docstring)."""
    gmax = group_maxima(bits)
    return _cut(kth_largest_bits(gmax, k), e), gmax


def row_cutoffs(bits, k, e):
    """The cut from each row's own k-th largest bf16 value rather than its group maxima
    (``cutoffs``): a full top-k per row, for the few rows whose group maxima decide nothing."""
    return _cut(kth_largest_bits(bits, k), e)


def kth_largest(values, k):
    """Each row's k-th largest value (the dtype's own order: ReLU'd bf16 bits order as their
    values do)."""
    return torch.topk(values, k, dim=1, sorted=False).values.amin(1)


def kth_largest_bits(bits, k):
    """float32 value of each row's k-th largest bf16 bit pattern (ReLU'd values)."""
    return bits_to_float(kth_largest(bits, k))


def _cut(c, e):
    """The cut below which no top-k member's bf16 value lies, given k distinct entries with bf16
    values >= c and the per-row error bound e (module docstring)."""
    u = BF16_UNIT
    return (1 - u) * (c / (1 + u) - 2 * e)


# Masks of at least this many entries are compacted word by word (sparse_nonzero).
SPARSE_NONZERO_MIN = 1 << 14


def sparse_nonzero(mask):
    """(rows, cols) of a 2-D bool mask's True entries, row-major: torch.nonzero's answer.

    For a large mask with few True entries, it reads the mask as int64 words (8 entries each)
    and expands only the non-zero words: 2.2-2.6x faster than nonzero on [512, 6144] with 62
    per row, and [64, 4096] with 45 per row (2-core AMD EPYC)."""
    n, m = mask.shape
    if mask.numel() < SPARSE_NONZERO_MIN or m % 8 or not mask.is_contiguous():
        return mask.nonzero(as_tuple=True)
    words = mask.view(torch.int64).view(-1).nonzero().squeeze(1)
    hit = mask.view(-1, 8).index_select(0, words).view(-1).nonzero().squeeze(1)
    flat = words.index_select(0, hit >> 3) * 8 + (hit & 7)
    return flat // m, flat % m


def bits_at_least_(bits, cut_bits):
    """The bool mask ``bits >= cut_bits[:, None]`` for ReLU'd bf16 bits and cuts from
    ``bf16_ceil_bits`` (>= 1) or NO_BITS_SURVIVE, made in place as ``clamp(bits - (cut - 1),
    0)`` converted to bool (``bits`` is overwritten): torch's CPU comparisons run
    unvectorised, its arithmetic and conversions do not (0.17 vs 0.72 ms on [512, 6144], 2-core
    AMD EPYC). A -0.0 (bits -32768) wraps to a positive difference for cuts >= 2 and survives;
    it is rescored like any survivor, and one survivor more never changes the exact top-k."""
    return bits.sub_((cut_bits - 1)[:, None]).clamp_min_(0).bool()


def survivors(values, cut):
    """(rows, cols) of the entries >= cut[row], row-major with ascending columns."""
    return sparse_nonzero(values >= cut[:, None])


def fp16_product_error(e, q_absmax, b_absmax):
    """Per row: a bound on |q - pre| for every latent of a float16 one-row product, where
    ``q = fl32(fp16(s) + b)``: s accumulated in float32 from float16 copies of xc and W (within
    ``e`` of pre - b, see ``input_error``, the bias left out of it), its output rounded to
    float16 (relative FP16_UNIT, or FP16_TINY below the normal range), the exact float32 bias
    added in float32. ``q_absmax``, ``b_absmax``: the row's max |q| and max |b| (they bound
    |fp16(s)| <= |q| / (1 - FP32_UNIT) + |b|). Python floats; inf or nan where q overflowed."""
    q_sum = q_absmax / (1 - FP32_UNIT)
    s_max = (q_sum + b_absmax + FP16_TINY) / (1 - FP16_UNIT)
    return 1.001 * (e + FP16_UNIT * s_max + FP16_TINY + FP32_UNIT * q_sum)


def fp16_row_cut(q, k, error, own_kth: bool = False):
    """The cut for one row of q (float32, [d_sae]) within ``error`` of the exact pre-activations:
    every top-k member of relu(pre) has q >= cut. Its c is the k-th largest of the group
    maxima (k distinct latents with q >= c, so pre >= c - error for each, and the k-th largest
    relu(pre) is at least c - error); a member m then has q[m] >= pre[m] - error >= c - 2 error.
    With ``own_kth`` the row's own k-th largest q is c instead (a top-k over the row; the best
    such bound). A cut that is not positive (ReLU zeros could be in the top-k) or not a number
    decides nothing: the caller decides the row another way."""
    c = float(torch.topk(q if own_kth else group_maxima(q[None])[0], k, sorted=False).values.min())
    return c - 2 * error


def group_then_descending_key(groups, values):
    """int64 sort keys ordering entries by group ascending, then value descending, for float
    values >= 0: a non-negative float's bit pattern orders as the float does, so (group,
    -value) packs into one integer. -0.0 ranks as 0.0."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)
    return groups * (1 << 31) + ((1 << 31) - 1 - bits)


def topk_of_survivors(values, rows, cols, n, k):
    """Exact top-k per row among survivors (``values[nnz]`` rescored exactly and ReLU'd, so
    >= 0; rows/cols row-major with ascending columns): (values[n, k], indices[n, k]) with the
    reference's tie rule (value descending, then index ascending). Rows with fewer than k
    survivors come back padded with -inf; a caller fills them another way.

    One stable sort of ``group_then_descending_key(rows, values)``: stability keeps equal
    values in ascending column order. A top-k over a padded [n, most survivors] matrix took
    2.4x as long (13 vs 5.5 ms for 4096 rows of 62 survivors, 2-core AMD EPYC)."""
    if not rows.numel():
        return values.new_full((n, k), float("-inf")), cols.new_zeros(n, k)
    order = torch.sort(group_then_descending_key(rows, values), stable=True).indices
    counts = torch.bincount(rows, minlength=n)
    slot = torch.arange(k, device=rows.device)
    present = slot < counts[:, None]
    place = (torch.cumsum(counts, 0) - counts)[:, None] + slot
    take = order[place.masked_fill_(~present, 0)]
    return values[take].masked_fill_(~present, float("-inf")), cols[take].masked_fill_(~present, 0)


def pad_with_live(values, indices, dead_mask, k_aux):
    """An AuxK code with fewer than k_aux entries (fewer latents dead) completed as the
    reference does: value 0 at the lowest live indices; values clamped to >= 0."""
    n, missing = values.shape[0], k_aux - indices.shape[1]
    if missing > 0:
        live = (~dead_mask).nonzero().squeeze(1)[:missing]
        values = torch.cat([values, values.new_zeros(n, missing)], 1)
        indices = torch.cat([indices, live.expand(n, missing)], 1)
    return values.clamp_min(0.0), indices
