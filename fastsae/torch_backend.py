"""The "torch" backend: the sparse primitives in plain PyTorch (the CPU default).

Every backend module (this one and the Triton launchers in ``fastsae.kernels``) provides
the same primitives with the same signatures, so ``fastsae.ops`` writes each autograd rule
once. Conventions shared by all backends:

* ``W`` is latent-major ``[m, d]`` (``m`` = d_sae rows, one per latent).
* A fixed-k code is ``(values[N, k], indices[N, k])``; a variable-L0 code is CSR:
  ``(values[nnz], indices[nnz], row_offsets[N + 1])``. Indices are int64.
* Float inputs of one call share a dtype; results come back in that dtype, and all
  accumulation happens in at least float32.
* Top-k order: values descending; equal values are ordered by ascending latent index
  (the tie rule of ``fastsae.reference``).

Primitives:

* ``gather(values, indices, W, bias=None) -> [N, d]``: ``out[n] = sum_j v[n,j] W[i[n,j]] (+ bias)``
* ``gather_dot(g, indices, W) -> [N, k]``: ``out[n,j] = <g[n], W[i[n,j]]>``
* ``scatter_add(values, indices, g, num_rows) -> [num_rows, d]``:
  ``out[m] = sum over (n,j) with i[n,j] = m of v[n,j] g[n]``
* ``csr_gather``, ``csr_gather_dot``, ``csr_scatter_add``: the same for CSR codes.
* ``topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0)
  -> (values, indices, aux_values, aux_indices)``: top-k of ``relu((x - b_dec) W^T + b)``;
  with a dead mask, also the top-``k_aux`` of the dead latents' ReLU pre-activations (slots
  beyond the number of dead latents hold value 0).
* ``threshold_encode(x, W, b, b_dec, cutoff) -> (pre_values, indices, row_offsets)``: CSR of
  the pre-activations ``pre[n,m]`` with ``pre[n,m] > cutoff[m]``, indices ascending per row.
"""
from __future__ import annotations

import glob
import math
import os
import warnings

import torch
import torch.nn.functional as F

from fastsae import buffers, selection


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# A matrix of at most half the last-level cache stays cached while a sparse product reads
# its rows in any order; a larger one is better read row by row in order. Measured on a
# 2-core AMD EPYC (32 MiB L3), 4096 rows of d 384, sampled_addmm on the pattern by row vs by
# latent: rescoring 62 survivors per row, W of 9 MiB 6.3 vs 10.3 ms, 18 MiB 10.7 vs 10.5,
# 36 MiB 21.1 vs 10.5; the backward's gather-dot at k 32 (grouping by latent included) 3.0
# vs 4.7, 5.8 vs 4.7, 10.8 vs 5.1.
def _last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            pass
    return max(sizes, default=32 * 2**20)


CACHE_RESIDENT_BYTES = _last_level_cache_bytes() // 2


def _cache_resident(device, rows, cols) -> bool:
    """Whether an fp32 [rows, cols] matrix on this device counts as cached (CPU only)."""
    return device.type == "cpu" and rows * cols * 4 <= CACHE_RESIDENT_BYTES


def _sparse_csr(row_offsets, cols, values, shape):
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(row_offsets, cols, values, size=shape, check_invariants=False)


def _sampled_dots(row_offsets, cols, A, B, bias):
    """bias[e] + <A[row of e], B[cols[e]]> for the entries of a CSR pattern, in row order
    (torch's sampled_addmm; columns in any order within a row)."""
    pattern = _sparse_csr(row_offsets, cols, bias, (A.shape[0], B.shape[0]))
    return torch.sparse.sampled_addmm(pattern, A, B.t()).values()


SUMS_BLOCK_BYTES = 4 * 2**20


class _LatentMajor:
    """A code's entries grouped by latent (stable, so in row order within a latent): the CSR
    pattern of the transposed code. ``row_of_entry`` None: a fixed-k code's [N, k] indices."""

    def __init__(self, indices, num_rows, row_of_entry=None):
        by_latent, self.order = torch.sort(indices.reshape(-1), stable=True)
        self.offsets = row_offsets_from_counts(torch.bincount(by_latent, minlength=num_rows))
        self.rows = self.order // indices.shape[1] if row_of_entry is None else row_of_entry[self.order]

    def sums(self, values_flat, g):
        """out[m] = sum over the entries e of latent m of values[e] g[row of e], by PyTorch's
        embedding-bag forward (one bag per latent, summed in entry order: deterministic).
        Faster than a latent-major CSR x dense product or the embedding-bag backward at every
        shape measured (4096 rows, 2-core AMD EPYC): d_sae 6144, d 384, k 32: 2.6 vs 4.6 and
        8.6 ms; d_sae 24576, d 768, k 64: 12 vs 18 and 40 ms.

        An output of fastsae.buffers' size (a weight gradient at d_sae 24576, d 768) is summed
        into a kept buffer in blocks of latents of SUMS_BLOCK_BYTES: made anew, its pages are
        faulted in again every step (41-54 ms with the faults, 19 ms in 4 MiB blocks at that
        shape, 2-core AMD EPYC); small blocks keep the extra memory small."""
        acc = _acc_dtype(g.dtype)
        g_acc, weights = g.to(acc), values_flat[self.order].to(acc)
        m, d = self.offsets.numel() - 1, g.shape[1]
        if g.device.type != "cpu" or m * d * acc.itemsize < buffers.MIN_BYTES:
            return F.embedding_bag(self.rows, g_acc, offsets=self.offsets[:-1], per_sample_weights=weights,
                                   mode="sum").to(g.dtype)
        out = buffers.empty((m, d), acc, g.device)
        for latents, entries in _csr_blocks(self.offsets, max(1, SUMS_BLOCK_BYTES // (d * acc.itemsize))):
            out[latents] = F.embedding_bag(self.rows[entries], g_acc, offsets=self.offsets[latents] - entries.start,
                                           per_sample_weights=weights[entries], mode="sum")
        return out.to(g.dtype)


def _dots_by_latent(major: _LatentMajor, W, A, bias):
    """bias[e] + <A[row of e], W[latent of e]> for a code's entries, in their own order, taken
    latent by latent through sampled_addmm on the transposed pattern (latents as rows): each
    row of W is read once, where a W too big to stay cached would be read once per entry."""
    dots = _sampled_dots(major.offsets, major.rows, W, A, bias[major.order])
    return torch.empty_like(dots).index_copy_(0, major.order, dots)


def _kept_for_code(kept: list, make, indices, num_rows):
    """make(indices, num_rows), kept in ``kept`` for the last two codes: a training step's
    backward scatters and gathers along the same indices three times (the decoder's gradients,
    then the encoder's), alternating between its main and AuxK codes. Reused only for the same
    storage at the same version (a live reference is kept, so its memory cannot be reused by
    another tensor meanwhile)."""
    key = (indices.data_ptr(), indices.shape, indices.stride(), indices._version, num_rows)
    for entry in kept:
        if entry[0] == key:
            return entry[2]
    answer = make(indices, num_rows)
    kept[:] = [(key, indices, answer)] + kept[:1]
    return answer


_latent_majors: list = []  # the last codes transposed


def _latent_major(indices, num_rows) -> _LatentMajor:
    return _kept_for_code(_latent_majors, _LatentMajor, indices, num_rows)


def gather(values, indices, W, bias=None):
    acc = _acc_dtype(W.dtype)
    out = F.embedding_bag(indices, W.to(acc), per_sample_weights=values.to(acc), mode="sum")
    if bias is not None:
        out.add_(bias.to(acc))  # in place: the bag's output is ours
    return out.to(W.dtype)


# Both sparse backward primitives are PyTorch's own embedding-bag backward kernels, called
# directly (mode 0 = "sum"): no forward pass is redone, no [nnz, d] temporary is made, and the
# weight gradient sums each latent's entries in a fixed (sorted) order, so it is deterministic.
_SUM_MODE = 0


def _bag_dot(g, indices_flat, offsets, bag_of_entry, W):
    """<g[bag], W[i]> for every entry i of every bag (the per-sample-weight gradient)."""
    acc = _acc_dtype(W.dtype)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        g.to(acc).contiguous(), W.to(acc), indices_flat, offsets, bag_of_entry, _SUM_MODE)
    return out.to(g.dtype)


def _bag_scatter(values_flat, indices_flat, bag_of_entry, bag_sizes, g, num_rows):
    """out[m] = sum of values * g[bag] over the entries of latent m (the weight gradient)."""
    acc = _acc_dtype(g.dtype)
    if values_flat.numel() == 0:
        return torch.zeros(num_rows, g.shape[1], dtype=g.dtype, device=g.device)
    out = torch.ops.aten._embedding_bag_dense_backward(
        g.to(acc).contiguous(), indices_flat, bag_of_entry, bag_sizes, indices_flat.new_empty(0), num_rows, False,
        _SUM_MODE, values_flat.to(acc))
    return out.to(g.dtype)


def _fixed_bags(n, k, device):
    """(bag of every entry, size of every bag) for n bags of k entries."""
    bag_of_entry = torch.arange(n, device=device).repeat_interleave(k)
    return bag_of_entry, torch.full((n,), k, dtype=torch.long, device=device)


# A fixed-k code whose entries fall on few distinct latents (AuxK's lie on the dead latents
# only) is cheaper as a dense [N, used] matrix and one GEMM than entry by entry: a GEMM runs
# an order of magnitude more multiply-adds per second than the embedding-bag kernels, so it
# wins while used latents <= this factor x k.
DENSE_CODE_FACTOR = 8


_narrow_codes: list = []  # the last codes' answers


def _narrow_code(indices, num_rows):
    """(used latent ids, [N, k] column of every entry among them) when the code touches at
    most DENSE_CODE_FACTOR x k distinct latents, else None."""
    return _kept_for_code(_narrow_codes, _find_narrow_code, indices, num_rows)


def _find_narrow_code(indices, num_rows):
    n, k = indices.shape
    if n * k == 0:
        return None
    used = torch.bincount(indices.reshape(-1), minlength=num_rows).nonzero().squeeze(1)
    if used.numel() > DENSE_CODE_FACTOR * k:
        return None
    column_of = torch.zeros(num_rows, dtype=torch.long, device=indices.device)
    column_of[used] = torch.arange(used.numel(), device=indices.device)
    return used, column_of[indices]


def gather_dot(g, indices, W):
    n, k = indices.shape
    if n * k == 0:
        return torch.zeros(n, k, dtype=g.dtype, device=g.device)
    narrow = _narrow_code(indices, W.shape[0])
    if narrow is not None:
        used, columns = narrow
        if g.device.type == "cpu" and g.dtype == W.dtype == torch.float32 and _ONEDNN_LINEAR is not None:
            # oneDNN's linear: 10.7 vs 15.5 ms with torch.mm (N 4096, d 384, 615 latents, k 192; 2-core AMD EPYC)
            dots = _ONEDNN_LINEAR(g.contiguous(), W[used], None, "none", [], "")
        else:
            acc = _acc_dtype(W.dtype)
            dots = g.to(acc) @ W[used].to(acc).t()
        return dots.gather(1, columns).to(g.dtype)
    if g.device.type == "cpu" and g.dtype == W.dtype == torch.float32:
        # sampled_addmm: faster than the embedding-bag backward at every shape measured (12 vs
        # 16 ms at 4096 x 6144, k 32; 84 vs 114 ms at 4096 x 24576, k 64; 2-core AMD EPYC). Its
        # CPU kernel takes each stored entry's dot on its own, so a pattern's columns need no
        # sorting into CSR order (3.8 vs 7.2 ms with the sort and the scatter back at 4096 x
        # 6144, k 32); tests/test_ops.py holds it to the reference on unsorted codes.
        if not _cache_resident(W.device, *W.shape):
            # By latent, on the transposed code the weight gradient groups anyway (kept for
            # it): each row of W read once (14 vs 43 ms at 4096 x 24576 x 768, k 64).
            return _dots_by_latent(_latent_major(indices, W.shape[0]), W, g, g.new_zeros(n * k)).view(n, k)
        row_offsets = torch.arange(0, n * k + 1, k, device=g.device)
        return _sampled_dots(row_offsets, indices.reshape(-1), g, W, g.new_zeros(n * k)).view(n, k)
    offsets = torch.arange(0, n * k, k, device=g.device)
    bag_of_entry, _ = _fixed_bags(n, k, g.device)
    return _bag_dot(g, indices.reshape(-1), offsets, bag_of_entry, W).reshape(n, k)


def scatter_add(values, indices, g, num_rows):
    n, k = indices.shape
    narrow = _narrow_code(indices, num_rows)
    if narrow is not None:
        used, columns = narrow
        acc = _acc_dtype(g.dtype)
        dense = torch.zeros(n, used.numel(), dtype=acc, device=g.device).scatter_add_(1, columns, values.to(acc))
        out = torch.zeros(num_rows, g.shape[1], dtype=acc, device=g.device)
        out[used] = dense.t() @ g.to(acc)
        return out.to(g.dtype)
    if n * k and g.device.type == "cpu":
        return _latent_major(indices, num_rows).sums(values.reshape(-1), g)
    bag_of_entry, bag_sizes = _fixed_bags(n, k, g.device)
    return _bag_scatter(values.reshape(-1), indices.reshape(-1), bag_of_entry, bag_sizes, g, num_rows)


def row_offsets_from_counts(counts):
    """CSR row offsets [N + 1] from per-row entry counts [N]."""
    row_offsets = counts.new_zeros(counts.numel() + 1, dtype=torch.long)
    row_offsets[1:] = torch.cumsum(counts, 0)
    return row_offsets


def csr_row_ids(row_offsets, nnz: int | None = None):
    """The row of every stored entry of a CSR code."""
    counts = row_offsets[1:] - row_offsets[:-1]
    rows = torch.arange(counts.numel(), device=row_offsets.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


# A CSR code storing more than these fractions of its [N, d_sae] entries runs as dense GEMMs
# on row blocks of its dense form. A JumpReLU, ReLU or Gated SAE opens a third to a half of its
# latents at initialisation and, on its defaults, about a seventh for its first hundreds of
# steps; there the GEMMs' higher rate beats the sparse kernels' fewer multiply-adds. The
# crossovers at N 4096, d_in 384, d_sae 6144 (2-core AMD EPYC, sparse vs dense ms): scatter-add
# 91 vs 121 at 8.3% stored, 163 vs 119 at 12.5%; gather-dot 113 vs 143 at 12.5%, 188 vs 133 at
# 16.7%; gather 98 vs 155 at 25%, 198 vs 145 at 50%.
DENSE_CSR_SCATTER = 1 / 10
DENSE_CSR_GATHER_DOT = 1 / 7
DENSE_CSR_GATHER = 3 / 8


def _dense_csr(indices, row_offsets, m, fraction) -> bool:
    n = row_offsets.numel() - 1
    return indices.numel() > fraction * n * m


def _csr_blocks(row_offsets, rows):
    """(row slice, entry slice) per block of ``rows`` rows of a CSR pattern."""
    n = row_offsets.numel() - 1
    offsets = row_offsets.tolist()
    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        yield block, slice(offsets[block.start], offsets[block.stop])


def _csr_row_blocks(row_offsets, m):
    """(row slice, entry slice, each entry's row within the block) per block of rows whose
    dense [rows, m] float32 form takes about CPU_BLOCK_BYTES."""
    for block, entries in _csr_blocks(row_offsets, max(1, CPU_BLOCK_BYTES // (4 * max(1, m)))):
        yield block, entries, csr_row_ids(row_offsets[block.start:block.stop + 1], entries.stop - entries.start)


def _dense_block(values, indices, entries, local_rows, num_rows, m, dtype):
    """The dense [num_rows, m] form of a block of a CSR code; a latent repeated in a row adds up."""
    block = torch.zeros(num_rows, m, dtype=dtype, device=values.device)
    return block.index_put_((local_rows, indices[entries]), values[entries].to(dtype), accumulate=True)


def csr_gather(values, indices, row_offsets, W, bias=None):
    acc = _acc_dtype(W.dtype)
    if _dense_csr(indices, row_offsets, W.shape[0], DENSE_CSR_GATHER):
        out = torch.empty(row_offsets.numel() - 1, W.shape[1], dtype=acc, device=W.device)
        Wa = W.to(acc)
        for rows, entries, local in _csr_row_blocks(row_offsets, W.shape[0]):
            code = _dense_block(values, indices, entries, local, rows.stop - rows.start, W.shape[0], acc)
            torch.mm(code, Wa, out=out[rows])
        if bias is not None:
            out.add_(bias.to(acc))
        return out.to(W.dtype)
    out = F.embedding_bag(indices, W.to(acc), offsets=row_offsets[:-1], per_sample_weights=values.to(acc),
                          mode="sum", include_last_offset=False)
    if bias is not None:
        out.add_(bias.to(acc))  # in place: the bag's output is ours
    return out.to(W.dtype)


def csr_gather_dot(g, indices, row_offsets, W):
    if indices.numel() == 0:
        return torch.zeros(0, dtype=g.dtype, device=g.device)
    if _dense_csr(indices, row_offsets, W.shape[0], DENSE_CSR_GATHER_DOT):
        acc = _acc_dtype(W.dtype)
        out = torch.empty(indices.numel(), dtype=acc, device=g.device)
        Wt = W.to(acc).t()
        for rows, entries, local in _csr_row_blocks(row_offsets, W.shape[0]):
            out[entries] = (g[rows].to(acc) @ Wt)[local, indices[entries]]
        return out.to(g.dtype)
    return _bag_dot(g, indices, row_offsets[:-1], csr_row_ids(row_offsets, indices.numel()), W)


def csr_scatter_add(values, indices, row_offsets, g, num_rows):
    if _dense_csr(indices, row_offsets, num_rows, DENSE_CSR_SCATTER):
        acc = _acc_dtype(g.dtype)
        out = buffers.zeros((num_rows, g.shape[1]), acc, g.device)
        for rows, entries, local in _csr_row_blocks(row_offsets, num_rows):
            code = _dense_block(values, indices, entries, local, rows.stop - rows.start, num_rows, acc)
            out.addmm_(code.t(), g[rows].to(acc))
        return out.to(g.dtype)
    if indices.numel() and g.device.type == "cpu":
        return _LatentMajor(indices, num_rows, csr_row_ids(row_offsets, indices.numel())).sums(values, g)
    return _bag_scatter(values, indices, csr_row_ids(row_offsets, indices.numel()), row_offsets.diff(), g, num_rows)


def _onednn_runs(op, dtype) -> bool:
    """Whether oneDNN's linear ``op`` runs on ``dtype`` operands here: one tiny call. Decided
    once, at import, so that a later error (out of memory, say) is raised as it is instead of
    being taken for a missing kernel, which would drop the fast path for the rest of the
    process; builds and CPUs without oneDNN's bf16 kernels refuse bfloat16."""
    one = torch.ones(8, 8, dtype=dtype)
    try:
        op(one[:1], one, one[0], "relu", [], "")
        return True
    except RuntimeError:
        return False


def _onednn_linear_op():
    """oneDNN's linear with bias and ReLU in its epilogue (what torch.compile emits for CPU
    linear layers), or None where this torch build lacks it or this CPU cannot run it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None
    return op if op is not None and _onednn_runs(op, torch.float32) else None


_ONEDNN_LINEAR = _onednn_linear_op()
_ONEDNN_BF16 = _ONEDNN_LINEAR is not None and _onednn_runs(_ONEDNN_LINEAR, torch.bfloat16)


def _blocked_weights_run() -> bool:
    """Whether oneDNN's linear takes a bf16 weight reordered beforehand into its own blocked
    layout (``mkldnn._reorder_linear_weight``) and gives the plain weight's answer: one tiny
    call, at import."""
    W = torch.arange(64, dtype=torch.bfloat16).view(8, 8)
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    try:
        blocked = torch.ops.mkldnn._reorder_linear_weight(W)
        return torch.equal(_ONEDNN_LINEAR(x, blocked, None, "none", [], ""), _ONEDNN_LINEAR(x, W, None, "none", [], ""))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BLOCKED_BF16 = _ONEDNN_BF16 and _blocked_weights_run()


def encoder_preactivations(x, W, b, b_dec, relu: bool):
    """The encoder's dense pre-activations in accumulation precision, ReLU applied if asked.

    On CPU, oneDNN's fused linear runs the GEMM about 30% faster than the default BLAS at SAE
    shapes and applies bias and ReLU in the same pass; elsewhere (GPU, float64, builds without
    oneDNN) addmm.
    """
    acc = _acc_dtype(x.dtype)
    xc = x.to(acc) if b_dec is None else x.to(acc) - b_dec.to(acc)
    W, b = W.to(acc), b.to(acc)
    if _ONEDNN_LINEAR is not None and xc.device.type == "cpu" and acc == torch.float32:
        return _ONEDNN_LINEAR(xc, W, b, "relu" if relu else "none", [], "")
    pre = torch.addmm(b, xc, W.t())
    return torch.relu_(pre).add_(0.0) if relu else pre  # +0.0 turns -0.0 into 0.0 so ties compare equal


def stable_topk(scores, k):
    """Top-k along the last dim of a 2-D tensor, ties broken by ascending index.

    torch.topk is fast but its tie order is unspecified. Asking it for k + 1 values shows
    where ties are: with none, its answer stands; otherwise the k winners are re-ranked, and
    rows where a tie straddles the k-th place get their tied slots refilled with the
    lowest-index entries of that value (common where many values are 0, as in AuxK's
    selection among dead latents). No second [N, m] tensor, no full sort.
    """
    m = scores.shape[-1]
    if k >= m:
        vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        return vals, idx
    vals, idx = torch.topk(scores, k + 1, dim=-1, sorted=True)
    adjacent_ties = vals[:, :-1] == vals[:, 1:]
    if not bool(adjacent_ties.any()):
        return vals[:, :k], idx[:, :k]  # all distinct: topk's order is already the rule's
    straddles = adjacent_ties[:, k - 1]
    vals, idx = vals[:, :k], idx[:, :k]
    # Re-rank the winners by (value desc, index asc): sort by index, then stable by value.
    by_index = torch.argsort(idx, dim=-1)
    vals, idx = vals.gather(-1, by_index), idx.gather(-1, by_index)
    by_value = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, idx = vals.gather(-1, by_value), idx.gather(-1, by_value)
    tied_rows = straddles.nonzero().squeeze(-1)
    if tied_rows.numel():
        idx[tied_rows] = _refill_straddling_tie(scores[tied_rows], vals[tied_rows], idx[tied_rows], k)
    return vals, idx


def _refill_straddling_tie(scores, vals, idx, k):
    """Indices of rows whose k-th value t also occurs past the k-th place: the winners above t
    keep their (already ranked) slots; the remaining slots take the entries equal to t in
    ascending index order, which is the rule's order. (Values need no change: they are all t.)"""
    t = vals[:, k - 1:k]
    above = ((vals > t) | vals.isnan()).sum(1, keepdim=True)  # NaN ranks above every number, as in topk
    equal = scores == t
    rank = equal.cumsum(1) - 1  # each equal entry's place among its row's equal entries
    row, col = (equal & (rank < k - above)).nonzero(as_tuple=True)  # row-major: ascending index
    idx = idx.clone()
    idx[row, above[row, 0] + rank[row, col]] = col
    return idx


def _nonnegative_topk(scores, k):
    """``stable_topk`` of scores >= 0 (ReLU'd, +0.0 for zero) by one top-k over unique int64
    keys: a non-negative float's bits order as the float does, and the low half of each key
    is (m - 1 - index), so equal values rank by ascending index without a tie pass. For rows
    full of equal zeros (AuxK among dead latents) it is 2.3x faster than stable_topk's
    re-ranking (3.8 vs 8.6 ms for 512 x 614, k 192); without ties it is 2x slower."""
    m = scores.shape[1]
    key = (scores + 0.0).view(torch.int32).to(torch.int64).mul_(1 << 32).add_(  # + 0.0: -0.0 ranks as 0.0
        torch.arange(m - 1, -1, -1, device=scores.device))
    top = torch.topk(key, k, dim=1, sorted=True).values
    return (top >> 32).to(torch.int32).view(torch.float32), (m - 1) - (top & 0xFFFFFFFF)


def dead_latent_topk(pre, k):
    """``stable_topk`` of the dead latents' ReLU'd pre-activations (+0.0 for zero; columns in
    ascending latent order, so index order is latent order). ReLU zeros tie in most rows here:
    in float32 one top-k over unique keys (``_nonnegative_topk``) instead of a tie pass."""
    top = _nonnegative_topk if pre.dtype == torch.float32 else stable_topk
    return top(pre, k)


def _dead_topk(x, W_dead, b_dead, b_dec, dead, dead_mask, k_aux):
    """Top-k_aux among the dead latents from a GEMM on their encoder rows alone (its cost
    follows the dead count, not d_sae), with the reference's padding: when fewer than k_aux
    latents are dead, the remaining slots take value 0 and the lowest live indices."""
    n = x.shape[0]
    if dead.numel():
        pre = encoder_preactivations(x, W_dead, b_dead, b_dec, relu=True)
        values, picked = dead_latent_topk(pre, min(k_aux, dead.numel()))
        indices = dead[picked]
    else:
        values, indices = x.new_zeros(n, 0, dtype=torch.float32), torch.zeros(n, 0, dtype=torch.long, device=x.device)
    return selection.pad_with_live(values, indices, dead_mask, k_aux)


# Dense pre-activations are made in row blocks of at most this many bytes on CPU: a block
# stays in the last-level cache for the top-k that reads it, and (below glibc's 32 MiB mmap
# ceiling) its memory is reused rather than mapped, first-touched and unmapped every call,
# which together cost about a third of the encode at d_sae 6144. A bf16 GEMM's block counts
# its 2-byte output, so its blocks have twice the rows: the GEMM runs faster on more rows (the
# bf16 TopK encode at d_in 768, d_sae 24576, k 64, N 4096: 488 vs 535 ms with 256- and 128-row
# blocks; 2-core AMD EPYC). The GPU gets one block.
CPU_BLOCK_BYTES = 16 * 2**20


def _row_blocks(x, d_sae, entry_bytes=4):
    """Slices of rows of x, one per dense pre-activation block of ``entry_bytes`` per entry."""
    n = x.shape[0]
    rows = n
    if x.device.type == "cpu":  # a power of two: oneDNN's GEMM runs 20-30% slower on, e.g., 682-row blocks
        rows = 1 << max(0, (CPU_BLOCK_BYTES // (entry_bytes * max(1, d_sae))).bit_length() - 1)
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)] or [slice(0, 0)]


def bf16_row_blocks(x, d_sae):
    """The row blocks the bf16 TopK encode runs its GEMM in: its output takes 2 bytes an entry."""
    return _row_blocks(x, d_sae, entry_bytes=2)


# ----------------------------------------------------------------------------- bf16 encoder GEMM

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_bf16_unit() -> str | None:
    """The CPU's bfloat16 matrix unit, or None where bf16 GEMMs would be emulated (slower
    than fp32)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


_BF16_UNIT = _cpu_bf16_unit()
ENCODE_GEMM_CHOICES = ("auto", "bf16", "fp32")


def encode_gemm_mode() -> str:
    """FASTSAE_CPU_ENCODE_GEMM: "auto" (bf16 where the CPU has a bf16 unit), "bf16" or "fp32"."""
    mode = os.environ.get("FASTSAE_CPU_ENCODE_GEMM", "auto")
    if mode not in ENCODE_GEMM_CHOICES:
        raise ValueError(f"FASTSAE_CPU_ENCODE_GEMM must be one of {ENCODE_GEMM_CHOICES}, got {mode!r}")
    return mode


# "auto" keeps smaller batches on the fp32 GEMM: the bf16 copy of the encoder, made per call,
# and the selection cost about what the bf16 GEMM saves on 512-1024 rows (TopK at d_in 384,
# d_sae 6144: N 512 22.8 ms in bf16 vs 17.7 in fp32, N 1024 35.7 vs 38.1; threshold encode
# at d_in 768, d_sae 24576: N 512 137 vs 135, N 1024 238 vs 281; 2-core AMD EPYC). The
# runtime's decode and prefill calls are far smaller.
BF16_MIN_ROWS = 1024


def uses_bf16_gemm(x, W, weights_cached: bool = False) -> bool:
    """Whether the encode of fp32 CPU tensors runs its GEMM in bfloat16 (then selects by
    cutoff and rescores in fp32, so results equal the fp32 path). ``weights_cached``: the
    caller keeps the bf16 copy across calls, so small batches pay too."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _ONEDNN_BF16:
        return False
    mode = encode_gemm_mode()
    return mode == "bf16" or (mode == "auto" and _BF16_UNIT is not None and
                              (weights_cached or x.shape[0] >= BF16_MIN_ROWS))


def cpu_encoder_gemms() -> dict[str, str]:
    """Which GEMM, in which precision, each encoder uses on this CPU, and the fallback; and
    the product of the runtime's one-row calls (for ``fastsae info``)."""
    fp32 = "oneDNN fused linear (bias, ReLU in its epilogue), float32" if _ONEDNN_LINEAR is not None else \
        "BLAS addmm, float32"
    mode = encode_gemm_mode()
    if not _ONEDNN_BF16 or mode == "fp32" or (mode == "auto" and _BF16_UNIT is None):
        why = ("no oneDNN in this torch build" if _ONEDNN_LINEAR is None else
               "this oneDNN runs no bfloat16 linear here" if not _ONEDNN_BF16 else
               "forced by FASTSAE_CPU_ENCODE_GEMM" if mode == "fp32" else "no bf16 unit on this CPU")
        topk = f"{fp32} ({why})"
    else:
        unit = _BF16_UNIT or "emulated: forced by FASTSAE_CPU_ENCODE_GEMM"
        if _ONEDNN_BLOCKED_BF16:
            unit += "; weights in oneDNN's blocked layout"
        topk = (f"oneDNN linear + ReLU in bfloat16 ({unit}), selection by cutoff, survivors rescored in "
                f"float32: equal to the float32 path; rows the cut cannot decide take a signed bfloat16 GEMM; "
                f"fallback {fp32} (rows neither decides, fewer than 2k groups of 64 latents)")
    if topk.startswith("oneDNN linear + ReLU in bfloat16"):
        threshold = (f"oneDNN linear in bfloat16 ({unit}), entries within the error bound of the cutoff rescored "
                     f"in float32: equal to the float32 path; fallback {fp32} (the rest of a batch once a row "
                     f"block has candidates in more than 1/{round(1 / THRESHOLD_BF16_MAX_DENSITY)} of its entries)")
    else:
        threshold = topk
    fp32_gemv = "float32 addmm on a transposed copy of the encoder, then top-k"
    if _fp16_reduced_precision_allowed():
        decode = f"{fp32_gemv} (float16 reductions are allowed in this process: no exact float16 product)"
    else:
        decode = (f"float16 torch.mv (float32 accumulation, checked on each kept copy), cut, survivors rescored in "
                  f"float32: equal to the float32 path, for encoders over {CACHE_RESIDENT_BYTES / 2**20:.0f} MiB in "
                  f"float32 (not cached between steps); smaller ones: {fp32_gemv}")
    # Tracking encodes its rows in batches (the rows above); a steering decode step encodes its one row.
    return {"topk, batchtopk": topk, "relu, jumprelu, gated": threshold, "topk runtime, one row": decode}


class LowPrecisionWeights:
    """The bf16 copies of an encoder a bf16 GEMM reads, with the rounding residuals its error
    bound needs. Made once per call (training changes the weights every step).

    The weight copy is kept in oneDNN's blocked layout where this torch can: given a plain
    weight, oneDNN's linear reorders it into that layout inside every call. Reordered once
    here (0.3 ms at d_sae 6144, d_in 384), the GEMMs compute the same outputs faster (2-core
    AMD EPYC): 46 vs 51 ms for 4096 rows in 1024-row blocks, 410 vs 449 ms at d_in 768,
    d_sae 24576 in 256-row blocks, 0.78 vs 1.04 ms for 64 rows; with the copy made per call,
    the TopK encode at the first shape takes 75.6 vs 77.7 ms."""

    def __init__(self, W, b):
        W16, self.b, self.residuals = selection.rounded_encoder(W, b, torch.bfloat16)
        self.W = torch.ops.mkldnn._reorder_linear_weight(W16) if _ONEDNN_BLOCKED_BF16 else W16


# ----------------------------------------------------------------------------- fp16 one-row encode

# A decode step multiplies one row by the encoder: it reads every weight once and does two
# flops per weight read, so it runs at memory speed, and a float16 copy (half the bytes) halves
# it. torch.mv's float16 kernel on CPU reads float16 and multiplies and accumulates in float32
# (unless torch._C._set_cpu_allow_fp16_reduced_precision_reduction(True) was called), which the
# error bound needs; bfloat16 has no such kernel here (torch.mv in bf16: 6.1 ms against
# 4.5 ms for the fp32 addmm at d_in 1280, d_sae 20480; fp16 2.5 ms; one thread, cold cache,
# 2-core AMD EPYC).

def _fp16_reduced_precision_allowed() -> bool:
    flag = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    return bool(flag()) if flag is not None else False


def fp16_rows_pay(W) -> bool:
    """Whether the float16 one-row encode beats the fp32 product for this encoder: only once the
    fp32 weights do not stay cached between decode steps (past half the last-level cache), so
    that halving the bytes read saves more than the cut and the rescoring cost (about 0.2 ms).
    One thread, cache flushed between steps, k 32, fp32 addmm + top-k against this path, on a
    2-core AMD EPYC (32 MiB L3): d_in 512, d_sae 8192 (16 MiB) 1.4 vs 1.9 ms; d_in 768,
    d_sae 12288 (36 MiB) 2.7 vs 2.0 ms; d_in 1280, d_sae 20480 (100 MiB) 5.3-6.1 vs 3.4-3.7 ms."""
    return W.device.type == "cpu" and W.dtype == torch.float32 and not _cache_resident(W.device, *W.shape)


def _accumulates_in_fp32(W16) -> bool:
    """Whether torch.mv on these float16 weights sums in float32: its answer for a random row
    is within the float32 accumulation bound of the float32 product of the same float16
    numbers (a float16 accumulation misses it by orders of magnitude)."""
    x16 = torch.randn(W16.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.float16)
    x32 = x16.float()
    got = torch.mv(W16, x16).float()
    gamma = 1.01 * (W16.shape[1] + 2) * selection.FP32_UNIT
    # float32 copies of a few rows at a time, not of the whole encoder
    for rows, got_rows in zip(W16.split(4096), got.split(4096)):
        rows = rows.float()
        want, accumulation = rows @ x32, 2 * gamma * (rows.abs() @ x32.abs())  # its sum's error and this one's
        bound = 1.01 * (selection.FP16_UNIT * (want.abs() + accumulation) + selection.FP16_TINY + accumulation)
        if not bool(((got_rows - want).abs() <= bound).all()):
            return False
    return True


class HalfPrecisionEncoder:
    """A float16 copy of an encoder for one-row products, kept across decode steps, with what
    the error bound needs. ``usable`` is False where the bound cannot hold: a weight outside
    float16's range, or a torch.mv that does not accumulate in float32."""

    def __init__(self, W, b):
        b = b.detach()
        self.W, _, self.residuals = selection.rounded_encoder(W, b, torch.float16, round_bias=False)
        self.b_absmax = float(b.abs().max()) if b.numel() else 0.0
        self.usable = self.residuals.finite and _accumulates_in_fp32(self.W)


def topk_rows_fp16(x, W, b, b_dec, k, half):
    """Top-k of relu((x - b_dec) W^T + b) for a few rows, each from a float16 torch.mv, a cut
    (``selection.fp16_row_cut``) and its survivors rescored in fp32: the fp32 answer. A row
    neither cut decides (``_fp16_survivors``; and every row, where the float16 product cannot be
    bounded) takes the fp32 GEMM. Returns (values [n, k], indices [n, k])."""
    if not half.usable or _fp16_reduced_precision_allowed() or not selection.usable(W.shape[0], k):
        return stable_topk(encoder_preactivations(x, W, b, b_dec, relu=True), k)
    xc = x if b_dec is None else x - b_dec
    xh = xc.to(torch.float16)
    errors = selection.input_error(xc, xh, half.residuals).tolist()
    values, indices = [], []
    for row, error in enumerate(errors):
        q = torch.mv(half.W, xh[row]).float().add_(b)
        bound = selection.fp16_product_error(error, float(q.abs().max()), half.b_absmax)
        cols, signed = _fp16_survivors(q, k, bound, W.shape[0])
        if cols is None:
            v, i = stable_topk(encoder_preactivations(x[row:row + 1], W, b, b_dec, relu=True), k)
            _count(hard_rows=1)
        else:
            exact = torch.mv(W.index_select(0, cols), xc[row]).add_(b[cols]).relu_().add_(0.0)
            if signed:
                v, i = topk_of_positive_survivors(exact, torch.zeros_like(cols), cols, 1, W.shape[0], k)
            else:
                v, i = stable_topk(exact[None], k)
                i = cols[i]
            _count(rows=1, survivors=cols.numel(), signed_rows=int(signed))
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def _fp16_survivors(q, k, bound, d_sae):
    """(latents of one float16 row product ``q`` that survive its cut, whether they are the
    signed survivors): the cut from the group maxima, else from the row's own k-th value, else
    every latent that could be exactly positive (q >= -bound, as in ``_topk_bf16_signed``).
    (None, False) where none decides the row: a cut that is not positive, or survivors over a
    quarter of the latents, and a bound that is not finite (q overflowed or holds a NaN)."""
    for own_kth in (False, True):
        cut = selection.fp16_row_cut(q, k, bound, own_kth)
        if cut > 0:
            cols = (q >= cut).nonzero().squeeze(1)
            if cols.numel() * 4 <= d_sae:
                return cols, False
    if math.isfinite(bound):
        cols = (q >= -bound).nonzero().squeeze(1)
        if cols.numel() * 4 <= d_sae:
            return cols, True
    return None, False


def _bf16_survivors(xc_bf16, error, lp, k):
    """One row block of the bf16 GEMM (``error``: its rows' ``selection.input_error``): (rows,
    cols) of the entries that survive the cut, and the rows the cut cannot decide (see
    fastsae.selection). The ReLU'd bf16 output is read through its int16 bits: no float32
    copy of it is made."""
    bits = selection.bf16_bits(_ONEDNN_LINEAR(xc_bf16, lp.W, lp.b, "relu", [], ""))
    cut, gmax = selection.cutoffs(bits, k, error)
    cut_bits, hard = _cut_bits(cut, gmax)
    retry = hard.nonzero().squeeze(1)
    if retry.numel():  # each from its own k-th value: a top-k over these rows only
        cut_bits[retry], hard[retry] = _cut_bits(selection.row_cutoffs(bits[retry], k, error[retry]), gmax[retry])
        _count(own_kth_rows=retry.numel())
    mask = selection.bits_at_least_(bits, cut_bits)
    rows, cols = selection.sparse_nonzero(mask)
    return rows, cols, hard


def _cut_bits(cut, gmax):
    """(cut as bf16 bits, rows it cannot decide) for the rows of a bf16 GEMM's output with group
    maxima ``gmax``. Undecidable: ReLU zeros possibly in the top-k (cut <= 0, or NaN), or so
    many survivors that the exact fp32 GEMM is cheaper. Undecided rows' cut lets nothing through."""
    hard = ~(cut > 0)
    cut_bits = selection.bf16_ceil_bits(cut.masked_fill(hard, float("inf")))
    hard |= (gmax >= cut_bits[:, None]).sum(1) * 4 > gmax.shape[1] * 3
    return cut_bits.masked_fill_(hard, selection.NO_BITS_SURVIVE), hard


def _rescore(xc, W, b, rows, cols):
    """Exact fp32 xc[rows] . W[cols] + b[cols] for entries in row-major order: in row order
    while W is cache-resident, else in latent order, so each encoder row is read from memory
    once for the whole batch (x is the small, cache-resident operand)."""
    if _cache_resident(W.device, *W.shape):
        row_offsets = row_offsets_from_counts(torch.bincount(rows, minlength=xc.shape[0]))
        return _sampled_dots(row_offsets, cols, xc, W, b[cols])
    # 37 vs 45 ms with the embedding-bag backward for 141 survivors per row at N 4096, d_in 768,
    # d_sae 24576.
    return _dots_by_latent(_LatentMajor(cols, W.shape[0], rows), W, xc, b[cols])


def _topk_bf16_survivors(x, W, b, b_dec, k, lp, blocks):
    """(rows, cols, undecided rows, xc, xc in bf16, error) of the whole batch, block by block."""
    xc = (x if b_dec is None else x - b_dec).contiguous()
    xc_bf16 = xc.to(torch.bfloat16)
    error = selection.input_error(xc, xc_bf16, lp.residuals)  # for the whole batch at once: fewer small calls
    parts = [_bf16_survivors(xc_bf16[rows], error[rows], lp, k) for rows in blocks]
    rows = torch.cat([p[0] + blocks[i].start for i, p in enumerate(parts)])
    cols = torch.cat([p[1] for p in parts])
    hard_rows = torch.cat([p[2] for p in parts]).nonzero().squeeze(1)
    return rows, cols, hard_rows, xc, xc_bf16, error


def _topk_bf16_signed(xc, xc_bf16, error, W, b, lp, k):
    """Exact top-k of relu(pre) for rows no positive cut decides (their k-th value within the
    bf16 error of 0), from a bf16 GEMM without ReLU on those rows: every entry that could be
    exactly positive (p >= -(1 + u) e) survives and is rescored in fp32. Returns (values,
    indices, rows still undecided (more than a quarter of the latents survive, or the bound is
    not finite), the survivor count)."""
    p = _ONEDNN_LINEAR(xc_bf16, lp.W, lp.b, "none", [], "").float()
    rows, cols = selection.sparse_nonzero(p >= (-(1 + selection.BF16_UNIT) * error)[:, None])
    # A finite bound bounds |p| too (finite weights, the products' sum under ||x|| ||W_m||): no NaN.
    undecided = (torch.bincount(rows, minlength=p.shape[0]) * 4 > W.shape[0]) | ~error.isfinite()
    if bool(undecided.any()):
        kept = ~undecided[rows]
        rows, cols = rows[kept], cols[kept]
    exact = _rescore(xc, W, b, rows, cols).clamp_min_(0.0)
    values, indices = topk_of_positive_survivors(exact, rows, cols, xc.shape[0], W.shape[0], k)
    return values, indices, undecided, rows.numel()


def topk_of_positive_survivors(values, rows, cols, n, m, k):
    """``selection.topk_of_survivors`` where the survivors (``values`` exact and ReLU'd) hold
    every exactly positive entry of their row: a row with fewer than k positives completes
    its top-k with zeros at the lowest other indices, the reference's tie rule."""
    positive = values > 0
    rows, cols, values = rows[positive], cols[positive], values[positive]
    top_values, top_indices = selection.topk_of_survivors(values, rows, cols, n, k)
    short_rows = (top_values[:, k - 1] == float("-inf")).nonzero().squeeze(1)
    if short_rows.numel():
        # A row's p < k positives take its first p slots; the zeros fill the rest in index order,
        # from the first 2k latents (at most p of them are positive, so k - p are not).
        span = min(m, 2 * k)
        low = cols < span
        is_positive = torch.zeros(n, span, dtype=torch.bool, device=cols.device)
        is_positive[rows[low], cols[low]] = True
        free = ~is_positive[short_rows]
        slot = (top_values[short_rows] > float("-inf")).sum(1, keepdim=True) + free.cumsum(1) - 1
        r, c = (free & (slot < k)).nonzero(as_tuple=True)
        top_values[short_rows[r], slot[r, c]] = 0.0
        top_indices[short_rows[r], slot[r, c]] = c
    return top_values, top_indices


def _topk_bf16(x, W, b, b_dec, k, lp, blocks):
    """Exact fp32 top-k of relu(pre) with the GEMM in bf16: survivors per row block, one
    rescoring pass, the exact top-k among them; rows no cut decides get the signed bf16 GEMM
    (``_topk_bf16_signed``), then, where that fails too, the fp32 GEMM."""
    n = x.shape[0]
    rows, cols, hard_rows, xc, xc_bf16, error = _topk_bf16_survivors(x, W, b, b_dec, k, lp, blocks)
    values, indices = selection.topk_of_survivors(_rescore(xc, W, b, rows, cols).clamp_min_(0.0), rows, cols, n, k)
    signed = signed_survivors = 0
    if hard_rows.numel():
        v, i, undecided, signed_survivors = _topk_bf16_signed(xc[hard_rows], xc_bf16[hard_rows], error[hard_rows],
                                                              W, b, lp, k)
        values[hard_rows], indices[hard_rows] = v, i
        signed = hard_rows.numel() - int(undecided.sum())
        hard_rows = hard_rows[undecided]
    if hard_rows.numel():
        hard_x = x[hard_rows]
        values[hard_rows], indices[hard_rows] = _topk_fp32(hard_x, W, b, b_dec, k, _row_blocks(hard_x, W.shape[0]))
    _count(rows=n - hard_rows.numel(), survivors=rows.numel() + signed_survivors, signed_rows=signed,
           hard_rows=hard_rows.numel())
    return values, indices


# Running totals of the low-precision TopK encodes (benchmarks report survivors per row):
# rows decided by a cut and their survivors, the rows whose group maxima decided nothing (cut
# again from their own k-th bf16 value), the rows decided only by the signed GEMM, and the
# rows that took the fp32 GEMM.
SURVIVORS = {"rows": 0, "survivors": 0, "own_kth_rows": 0, "signed_rows": 0, "hard_rows": 0}


def _count(**counts):
    for key, value in counts.items():
        SURVIVORS[key] += value


def reset_selection_counts() -> None:
    """Zero SURVIVORS and THRESHOLD_STATS."""
    for counts in (SURVIVORS, THRESHOLD_STATS):
        counts.update(dict.fromkeys(counts, 0))


def _topk_fp32(x, W, b, b_dec, k, blocks):
    parts = [stable_topk(encoder_preactivations(x[rows], W, b, b_dec, relu=True), k) for rows in blocks]
    return tuple(torch.cat(c) for c in zip(*parts)) if len(parts) > 1 else parts[0]


def topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0, low_precision=None):
    """``low_precision``: a ``LowPrecisionWeights`` of (W, b) to reuse; made here when the bf16
    GEMM is in use and none is given."""
    blocks = _row_blocks(x, W.shape[0])
    values = None
    if uses_bf16_gemm(x, W, weights_cached=low_precision is not None) and selection.usable(W.shape[0], k) \
            and x.shape[0]:
        lp = low_precision or LowPrecisionWeights(W, b)
        if lp.residuals.finite:
            values, indices = _topk_bf16(x, W, b, b_dec, k, lp, bf16_row_blocks(x, W.shape[0]))
    if values is None:
        values, indices = _topk_fp32(x, W, b, b_dec, k, blocks)
    n = x.shape[0]
    if dead_mask is not None and k_aux > 0:
        dead = dead_mask.nonzero().squeeze(1)
        W_dead, b_dead = W[dead], b[dead]
        aux = [_dead_topk(x[rows], W_dead, b_dead, b_dec, dead, dead_mask, k_aux) for rows in blocks]
        aux_values, aux_indices = (torch.cat(c) for c in zip(*aux)) if len(aux) > 1 else aux[0]
    else:
        aux_values, aux_indices = values.new_zeros(n, k_aux), indices.new_zeros(n, k_aux)
    return values.to(x.dtype), indices, aux_values.to(x.dtype), aux_indices


# A threshold encode keeps its GEMM in bf16 while the candidates (entries the bf16 values
# cannot rule out) stay below this fraction of a row block: each is rescored in fp32 at about
# 40 ns (d_in 384) where the bf16 GEMM saves about 3 ns per entry (2-core AMD EPYC). Past
# it, the rest of the call runs the fp32 GEMM.
THRESHOLD_BF16_MAX_DENSITY = 1 / 16
# Running totals (benchmarks report candidates per row and the rows that took the fp32 GEMM).
THRESHOLD_STATS = {"rows": 0, "candidates": 0, "fp32_rows": 0}


def _threshold_bf16(xc, W, b, cutoff, lp, bias_rounding, buffer):
    """(values, cols, counts) of one row block's entries with exact fp32 pre > cutoff, from a
    bf16 GEMM whose bias is b - cutoff (``lp``; made in fp32, within ``bias_rounding`` of the
    exact difference): its exact value s' is within e + bias_rounding of pre - c
    (fastsae.selection), so an entry with pre > c has bf16 value p' >= -(1 + u)(e +
    bias_rounding). Those candidates, taken with twice that margin, are rescored in fp32 and
    compared. None when they are too many."""
    xc_bf16 = xc.to(torch.bfloat16)
    shifted = buffer[:xc.shape[0]].copy_(_ONEDNN_LINEAR(xc_bf16, lp.W, lp.b, "none", [], ""))
    margin = (2 + 2 * selection.BF16_UNIT) * (selection.input_error(xc, xc_bf16, lp.residuals) + bias_rounding)
    rows, cols = selection.survivors(shifted, -margin)
    if rows.numel() > THRESHOLD_BF16_MAX_DENSITY * shifted.numel():
        return None
    exact = _rescore(xc, W, b, rows, cols)
    above = exact > cutoff[cols]
    THRESHOLD_STATS.update(rows=THRESHOLD_STATS["rows"] + xc.shape[0],
                           candidates=THRESHOLD_STATS["candidates"] + above.numel())
    rows, cols = rows[above], cols[above]
    return exact[above], cols, torch.bincount(rows, minlength=xc.shape[0])


def threshold_encode(x, W, b, b_dec, cutoff):
    blocks = _row_blocks(x, W.shape[0])
    bf16 = uses_bf16_gemm(x, W) and x.shape[0] and cutoff.dtype == x.dtype and bool(torch.isfinite(cutoff).all())
    lp = None
    if bf16:
        shifted_bias = b - cutoff
        lp = LowPrecisionWeights(W, shifted_bias)
        if not lp.residuals.finite:
            lp = None
    if lp is not None:
        bias_rounding = selection.FP32_UNIT * float(shifted_bias.abs().max())
        xc = (x if b_dec is None else x - b_dec).contiguous()
        buffer = torch.empty(blocks[0].stop - blocks[0].start, W.shape[0])
    values, indices, counts = [], [], []
    for rows in blocks:
        part = None if lp is None else _threshold_bf16(xc[rows], W, b, cutoff, lp, bias_rounding, buffer)
        if part is None:
            if lp is not None:
                THRESHOLD_STATS["fp32_rows"] += x.shape[0] - rows.start
            lp = None  # a dense code: the fp32 GEMM from here on
            pre = encoder_preactivations(x[rows], W, b, b_dec, relu=False)
            mask = pre > cutoff.to(pre.dtype)
            row, col = mask.nonzero(as_tuple=True)
            part = pre[row, col], col, mask.sum(-1)
        values.append(part[0].to(x.dtype))
        indices.append(part[1])
        counts.append(part[2])
    return torch.cat(values), torch.cat(indices), row_offsets_from_counts(torch.cat(counts))


def gated_encode(x, W, b, r_mag, b_mag, b_dec):
    pi, indices, row_offsets = threshold_encode(x, W, b, b_dec, torch.zeros(W.shape[0], dtype=x.dtype, device=x.device))
    magnitude = torch.relu(pi * torch.exp(r_mag[indices]) + b_mag[indices])
    return magnitude, pi, indices, row_offsets
