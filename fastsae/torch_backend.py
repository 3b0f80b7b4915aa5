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

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _narrow_code(indices, num_rows):
    """(used latent ids, [N, k] column of every entry among them) when the code touches at
    most DENSE_CODE_FACTOR x k distinct latents, else None."""
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
        acc = _acc_dtype(W.dtype)
        return (g.to(acc) @ W[used].to(acc).t()).gather(1, columns).to(g.dtype)
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


def csr_gather(values, indices, row_offsets, W, bias=None):
    acc = _acc_dtype(W.dtype)
    out = F.embedding_bag(indices, W.to(acc), offsets=row_offsets[:-1], per_sample_weights=values.to(acc),
                          mode="sum", include_last_offset=False)
    if bias is not None:
        out.add_(bias.to(acc))  # in place: the bag's output is ours
    return out.to(W.dtype)


def csr_gather_dot(g, indices, row_offsets, W):
    if indices.numel() == 0:
        return torch.zeros(0, dtype=g.dtype, device=g.device)
    return _bag_dot(g, indices, row_offsets[:-1], csr_row_ids(row_offsets, indices.numel()), W)


def csr_scatter_add(values, indices, row_offsets, g, num_rows):
    return _bag_scatter(values, indices, csr_row_ids(row_offsets, indices.numel()), row_offsets.diff(), g, num_rows)


def _onednn_linear_op():
    """oneDNN's linear with bias and ReLU in its epilogue (what torch.compile emits for CPU
    linear layers), or None where this torch build lacks it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def cpu_encoder_gemm() -> str:
    """What computes the encoder's pre-activations on CPU in float32 (for ``fastsae info``)."""
    return "oneDNN fused linear + ReLU" if _ONEDNN_LINEAR is not None else "BLAS addmm"


def encoder_preactivations(x, W, b, b_dec, relu: bool):
    """The encoder's dense pre-activations in accumulation precision, ReLU applied if asked.

    On CPU, oneDNN's fused linear runs the GEMM about 30% faster than the default BLAS at SAE
    shapes and applies bias and ReLU in the same pass; elsewhere (GPU, float64, builds without
    oneDNN) addmm.
    """
    acc = _acc_dtype(x.dtype)
    xc = x.to(acc) if b_dec is None else x.to(acc) - b_dec.to(acc)
    W, b = W.to(acc), b.to(acc)
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is not None and xc.device.type == "cpu" and acc == torch.float32:
        try:
            return _ONEDNN_LINEAR(xc, W, b, "relu" if relu else "none", [], "")
        except RuntimeError:  # a CPU this oneDNN build cannot serve: use BLAS from now on
            _ONEDNN_LINEAR = None
    pre = torch.addmm(b, xc, W.t())
    return torch.relu_(pre).add_(0.0) if relu else pre  # +0.0 turns -0.0 into 0.0 so ties compare equal


def _stable_topk(scores, k):
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
    above = (vals > t).sum(1, keepdim=True)
    equal = scores == t
    rank = equal.cumsum(1) - 1  # each equal entry's place among its row's equal entries
    row, col = (equal & (rank < k - above)).nonzero(as_tuple=True)  # row-major: ascending index
    idx = idx.clone()
    idx[row, above[row, 0] + rank[row, col]] = col
    return idx


def _dead_topk(pre, dead_mask, k_aux):
    """Top-k_aux of the dead latents' columns, with the reference's padding: when fewer than
    k_aux latents are dead, the remaining slots take value 0 and the lowest live indices."""
    dead = dead_mask.nonzero().squeeze(1)  # ascending, so ties keep ascending-index order
    n = pre.shape[0]
    values, picked = _stable_topk(pre[:, dead], min(k_aux, dead.numel())) if dead.numel() else (
        pre.new_zeros(n, 0), torch.zeros(n, 0, dtype=torch.long, device=pre.device))
    indices = dead[picked]
    missing = k_aux - indices.shape[1]
    if missing > 0:
        live = (~dead_mask).nonzero().squeeze(1)[:missing]
        values = torch.cat([values, pre.new_zeros(n, missing)], 1)
        indices = torch.cat([indices, live.expand(n, missing)], 1)
    return values.clamp_min(0.0), indices


# Dense pre-activations are made in row blocks of at most this many bytes on CPU: a block
# stays in the last-level cache for the top-k that reads it, and (below glibc's 32 MiB mmap
# ceiling) its memory is reused rather than mapped, first-touched and unmapped every call,
# which together cost about a third of the encode at d_sae 6144. The GPU gets one block.
CPU_BLOCK_BYTES = 16 * 2**20


def _row_blocks(x, d_sae):
    """Slices of rows of x, one per dense pre-activation block."""
    n = x.shape[0]
    rows = n
    if x.device.type == "cpu":  # a power of two: oneDNN's GEMM runs 20-30% slower on, e.g., 682-row blocks
        rows = 1 << max(0, (CPU_BLOCK_BYTES // (4 * max(1, d_sae))).bit_length() - 1)
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)] or [slice(0, 0)]


def _topk_block(x, W, b, b_dec, k, dead_mask, k_aux):
    pre = encoder_preactivations(x, W, b, b_dec, relu=True)
    values, indices = _stable_topk(pre, k)
    if dead_mask is not None and k_aux > 0:
        aux_values, aux_indices = _dead_topk(pre, dead_mask, k_aux)
    else:
        aux_values, aux_indices = pre.new_zeros(x.shape[0], k_aux), indices.new_zeros(x.shape[0], k_aux)
    return values.to(x.dtype), indices, aux_values.to(x.dtype), aux_indices


def topk_encode(x, W, b, b_dec, k, dead_mask=None, k_aux=0):
    blocks = _row_blocks(x, W.shape[0])
    if len(blocks) == 1:
        return _topk_block(x, W, b, b_dec, k, dead_mask, k_aux)
    parts = [_topk_block(x[rows], W, b, b_dec, k, dead_mask, k_aux) for rows in blocks]
    return tuple(torch.cat(column) for column in zip(*parts))


def threshold_encode(x, W, b, b_dec, cutoff):
    values, indices, counts = [], [], []
    for rows in _row_blocks(x, W.shape[0]):
        pre = encoder_preactivations(x[rows], W, b, b_dec, relu=False)
        mask = pre > cutoff.to(pre.dtype)
        row, col = mask.nonzero(as_tuple=True)
        values.append(pre[row, col].to(x.dtype))
        indices.append(col)
        counts.append(mask.sum(-1))
    return torch.cat(values), torch.cat(indices), row_offsets_from_counts(torch.cat(counts))


def gated_encode(x, W, b, r_mag, b_mag, b_dec):
    pi, indices, row_offsets = threshold_encode(x, W, b, b_dec, torch.zeros(W.shape[0], dtype=x.dtype, device=x.device))
    magnitude = torch.relu(pi * torch.exp(r_mag[indices]) + b_mag[indices])
    return magnitude, pi, indices, row_offsets
