"""Differentiable sparse SAE ops with a backend chosen per call.

Backends:

* ``"reference"``: ``fastsae.reference`` with PyTorch autograd (dense; the specification).
* ``"torch"``: ``fastsae.torch_backend`` primitives (the CPU default; nothing N x d_sae is
  built after the top-k).
* ``"triton"``: the kernels in ``fastsae.kernels`` (on CPU it runs under
  ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU).
* ``"auto"`` (the CUDA default): each primitive, per shape class, on whichever of "triton" and
  "torch" its first call timed faster (``fastsae.autotune``; the choices are cached on disk).

The choice, in order: the ``backend=`` argument, the innermost ``use_backend(...)`` context,
the ``FASTSAE_BACKEND`` environment variable, then the default for the tensors' device.

Each autograd rule is written once against the primitive set documented in
``fastsae.torch_backend``: the encoders' backward is a gather (dx), a scatter-add (dW) and
a per-latent reduction (db); the decoder's backward is a gather-dot and a scatter-add.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
import os
import types

import torch

from fastsae import reference, selection, torch_backend

BACKENDS = ("reference", "torch", "triton", "auto")

_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastsae_backend", default=None)
_checks_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("fastsae_checks", default=True)


# ----------------------------------------------------------------------------- backends

def _check_backend_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend ``name`` unless a call passes ``backend=``."""
    token = _backend_override.set(_check_backend_name(name, "backend"))
    try:
        yield
    finally:
        _backend_override.reset(token)


@contextlib.contextmanager
def input_checks(enabled: bool):
    """Turn the NaN/Inf scan of inputs on or off (it costs a pass and, on a GPU, a sync)."""
    token = _checks_enabled.set(bool(enabled))
    try:
        yield
    finally:
        _checks_enabled.reset(token)


def triton_available() -> bool:
    from fastsae import kernels
    return kernels.AVAILABLE


def default_backend(device: torch.device | str | None = None) -> str:
    """The backend used for tensors on ``device`` when nothing overrides it: "auto" on CUDA
    with Triton installed, else "torch" (the interpreter is no contender on a CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return "auto" if device.type == "cuda" and triton_available() else "torch"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is not None:
        return _check_backend_name(backend, "backend")
    if _backend_override.get() is not None:
        return _backend_override.get()
    env = os.environ.get("FASTSAE_BACKEND")
    if env:
        return _check_backend_name(env, "FASTSAE_BACKEND")
    return default_backend(device)


_TRITON_MODULES = {
    "gather": "sparse_matmul", "gather_dot": "sparse_matmul", "scatter_add": "sparse_matmul",
    "csr_gather": "sparse_matmul", "csr_gather_dot": "sparse_matmul", "csr_scatter_add": "sparse_matmul",
    "topk_encode": "encode", "threshold_encode": "encode", "gated_encode": "encode",
}


def _triton_primitives() -> types.SimpleNamespace:
    if not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package; install it or use backend='torch'")
    funcs = {}
    for name, module in _TRITON_MODULES.items():
        funcs[name] = getattr(importlib.import_module(f"fastsae.kernels.{module}"), name)
    return types.SimpleNamespace(**funcs)


@functools.lru_cache(maxsize=1)
def _auto_primitives() -> types.SimpleNamespace:
    from fastsae import autotune

    candidates = {"torch": torch_backend}
    if triton_available():
        candidates = {"triton": _triton_primitives(), **candidates}
    return autotune.auto_primitives(candidates, tuple(_TRITON_MODULES))  # the primitive set's names


def primitives(name: str):
    """The primitive set of a non-reference backend."""
    if name == "torch":
        return torch_backend
    if name == "triton":
        return _triton_primitives()
    if name == "auto":
        return _auto_primitives()
    raise ValueError(f"backend {name!r} has no primitive set; expected 'torch', 'triton' or 'auto'")


# ----------------------------------------------------------------------------- input checks

def _check_matrix(name, t, ndim=2):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_same(reference_name, ref, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {ref.device}; "
                             "move them to one device")
        if t.is_floating_point() and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {ref.dtype}; cast them to one dtype")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: whether every entry of t is finite (no host sync). Its minimum and
    maximum are finite exactly when every entry is (both reductions propagate NaN): one pass
    and no temporary, where torch.isfinite(t).all() compares entry by entry (0.1 vs 1.5 ms at
    4096 x 384 on a 2-core AMD EPYC)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def _check_finite(name, t):
    if _checks_enabled.get() and not bool(all_finite(t)):
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_vector(name, t, length, what):
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] ({what}), got {tuple(t.shape)}")


def _check_encoder(x, W, b, b_dec, W_name="W_enc", b_name="b_enc"):
    _check_matrix("x", x)
    _check_matrix(W_name, W)
    if x.shape[1] != W.shape[1]:
        raise ValueError(f"x has d_in={x.shape[1]} but {W_name} expects d_in={W.shape[1]} (shape {tuple(W.shape)})")
    _check_vector(b_name, b, W.shape[0], "d_sae")
    _check_vector("b_dec", b_dec, W.shape[1], "d_in")
    _check_same("x", x, **{W_name: W, b_name: b, "b_dec": b_dec})
    _check_finite("x", x)


def _check_k(name, k, d_sae, low=1):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not low <= k <= d_sae:
        raise ValueError(f"{name} must be in [{low}, d_sae={d_sae}], got {k}")


def _check_code(values, indices, W, W_name, row_offsets=None):
    _check_matrix(W_name, W)
    _check_matrix("values", values, 2 if row_offsets is None else 1)
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    if row_offsets is not None:
        if row_offsets.dim() != 1 or row_offsets.numel() < 1:
            raise ValueError(f"row_offsets must be a 1-D tensor of N + 1 offsets, got shape {tuple(row_offsets.shape)}")
        if row_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"row_offsets must be int32 or int64, got {row_offsets.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= W.shape[0]):
        raise ValueError(f"indices must lie in [0, d_sae={W.shape[0]}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    _check_same(W_name, W, values=values, indices=indices, row_offsets=row_offsets)


# ----------------------------------------------------------------------------- shared backward

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _latent_sums(p, values, indices, row_offsets, num_rows):
    """Per-latent sums of per-entry values (deterministic, via the scatter-add primitive)."""
    if values.device.type == "cpu":
        # index_add_ into a vector runs serially in entry order on CPU (deterministic), and
        # about 10x faster than the scatter primitive with a width-1 operand (0.16 vs 1.7 ms at
        # 4096 rows of k 32, d_sae 6144, 2-core AMD EPYC).
        acc = torch.promote_types(values.dtype, torch.float32)
        sums = torch.zeros(num_rows, dtype=acc).index_add_(0, indices.reshape(-1), values.reshape(-1).to(acc))
        return sums.to(values.dtype)
    n = indices.shape[0] if row_offsets is None else row_offsets.numel() - 1
    ones = torch.ones(n, 1, dtype=values.dtype, device=values.device)
    if row_offsets is None:
        return p.scatter_add(values, indices, ones, num_rows)[:, 0]
    return p.csr_scatter_add(values, indices, row_offsets, ones, num_rows)[:, 0]


def _encoder_backward(ctx, p, codes, row_offsets, x, W, b_dec):
    """Gradients of a sparse encoder given dL/dpre at its stored entries: ``codes`` is a list
    of (g_pre, indices) sharing ``row_offsets`` (None: fixed-k), whose gradients add up."""
    m = W.shape[0]
    need_x, need_W, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_bdec = b_dec is not None and ctx.needs_input_grad[3]
    xc = (x if b_dec is None else x - b_dec) if need_W else None
    dx = dW = db = db_dec = None
    for g_pre, indices in codes:
        if need_x:
            dx = _add(dx, p.gather(g_pre, indices, W) if row_offsets is None
                      else p.csr_gather(g_pre, indices, row_offsets, W))
        if need_W:
            dW = _add(dW, p.scatter_add(g_pre, indices, xc, m) if row_offsets is None
                      else p.csr_scatter_add(g_pre, indices, row_offsets, xc, m))
        if need_b or need_bdec:
            db = _add(db, _latent_sums(p, g_pre, indices, row_offsets, m))
    if need_bdec:
        # -sum_n dx[n] = -sum_m db[m] W[m]: one vector-matrix product instead of a gather per row.
        acc = torch.promote_types(W.dtype, torch.float32)
        db_dec = -(db.to(acc) @ W.to(acc)).to(b_dec.dtype)
    return dx, dW, (db if need_b else None), db_dec


def _add(total, part):
    return part if total is None else total + part


# ----------------------------------------------------------------------------- TopK encode

class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, b_dec, k, dead_mask, k_aux, p):
        values, indices, aux_values, aux_indices = p.topk_encode(x, W, b, b_dec, k, dead_mask, k_aux)
        ctx.save_for_backward(x, W, b_dec, values, indices, aux_values, aux_indices)
        ctx.p = p
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        x, W, b_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
        # ReLU: a selected value of 0 came from a non-positive pre-activation (no gradient).
        codes = [(torch.where(values > 0, g_values, 0).to(values.dtype).contiguous(), indices.contiguous())]
        if aux_indices.shape[1] and g_aux is not None:
            # AuxK's entries lie on the dead latents only: kept apart from the main code so a
            # backend can treat that narrow code on its own (the torch one as a small GEMM).
            codes.append((torch.where(aux_values > 0, g_aux, 0).to(values.dtype).contiguous(),
                          aux_indices.contiguous()))
        dx, dW, db, db_dec = _encoder_backward(ctx, ctx.p, codes, None, x, W, b_dec)
        return dx, dW, db, db_dec, None, None, None, None


def _empty_code(x, k):
    return (x.new_zeros(x.shape[0], k), torch.zeros(x.shape[0], k, dtype=torch.long, device=x.device))


def topk_encode_aux(x, W_enc, b_enc, k, b_dec=None, dead_mask=None, k_aux=0, backend=None):
    """TopK encode plus, in the same pass, the AuxK selection among dead latents.

    Returns (values[N,k], indices[N,k], aux_values[N,k_aux], aux_indices[N,k_aux]); values
    are differentiable with respect to x, W_enc, b_enc and b_dec.
    """
    _check_encoder(x, W_enc, b_enc, b_dec)
    d_sae = W_enc.shape[0]
    _check_k("k", k, d_sae)
    if dead_mask is not None:
        if dead_mask.dtype != torch.bool or dead_mask.shape != (d_sae,):
            raise ValueError(f"dead_mask must be a bool tensor of shape [{d_sae}], got "
                             f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
        _check_same("x", x, dead_mask=dead_mask)
        _check_k("k_aux", k_aux, d_sae, low=0)
    else:
        k_aux = 0
    name = resolve_backend(backend, x.device)
    if name == "reference":
        values, indices = reference.topk_encode(x, W_enc, b_enc, k, b_dec)
        if k_aux:
            return (values, indices) + reference.topk_aux(x, W_enc, b_enc, dead_mask, k_aux, b_dec)
        return (values, indices) + _empty_code(x, 0)
    if not _needs_grad(x, W_enc, b_enc, b_dec):  # inference: skip the autograd bookkeeping
        return primitives(name).topk_encode(x, W_enc.contiguous(), b_enc, b_dec, k, dead_mask, k_aux)
    return _TopKEncode.apply(x, W_enc.contiguous(), b_enc, b_dec, k, dead_mask, k_aux, primitives(name))


def dead_topk_encode(x, W_enc, b_enc, dead_mask, k_aux, b_dec=None):
    """AuxK's selection alone, for an SAE whose code is not a top-k (JumpReLU): the k_aux
    largest ReLU pre-activations per row among the dead latents, ties to the lower index, as
    ``reference.topk_aux`` (with fewer dead latents, the last slots hold 0 at live ones).
    Returns (values [N, k_aux], latent ids [N, k_aux]); values are differentiable with respect
    to x, W_enc, b_enc and b_dec. One GEMM on the dead latents' encoder rows, in torch on every
    backend (the TopK kinds select AuxK in their own pass)."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    if dead_mask.dtype != torch.bool or dead_mask.shape != (W_enc.shape[0],):
        raise ValueError(f"dead_mask must be a bool tensor of shape [{W_enc.shape[0]}], got "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    _check_k("k_aux", k_aux, W_enc.shape[0])
    dead = dead_mask.nonzero().squeeze(1)
    xc = x if b_dec is None else x - b_dec
    pre = torch.relu(torch.addmm(b_enc[dead], xc, W_enc[dead].t()))
    with torch.no_grad():
        _, position = torch_backend.dead_latent_topk(pre + 0.0, min(k_aux, dead.numel()))  # + 0.0: -0.0 is 0.0
    return selection.pad_with_live(pre.gather(1, position), dead[position], dead_mask, k_aux)


def topk_encode(x, W_enc, b_enc, k, b_dec=None, backend=None):
    """TopK SAE encode: (values[N,k], indices[N,k]) of relu((x - b_dec) W_enc^T + b_enc).

    Values are sorted descending with ties broken by ascending latent index.
    """
    values, indices, _, _ = topk_encode_aux(x, W_enc, b_enc, k, b_dec, backend=backend)
    return values, indices


def batch_topk_encode(x, W_enc, b_enc, k, b_dec=None, candidates=None, backend=None):
    """BatchTopK encode: the N*k largest ReLU pre-activations of the batch, as a CSR code.

    Each row first offers its top ``candidates`` entries (default min(d_sae, 4k)); the batch
    keeps the N*k best of those. The result equals the exact batch top-(N*k) whenever no
    row has all of its candidates kept: a kept set never reaches past a row's candidates, so
    nothing unoffered could have made it. When a row does fill up, the candidate count is
    doubled and the selection redone, so the result is always exact.
    Returns (values[nnz], indices[nnz], row_offsets[N+1]).
    """
    return batch_topk_encode_aux(x, W_enc, b_enc, k, b_dec, candidates=candidates, backend=backend)[:3]


def batch_topk_encode_aux(x, W_enc, b_enc, k, b_dec=None, dead_mask=None, k_aux=0, candidates=None, backend=None):
    """``batch_topk_encode`` plus the AuxK selection among dead latents from the same pass:
    (values, indices, row_offsets, aux_values[N,k_aux], aux_indices[N,k_aux])."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    d_sae = W_enc.shape[0]
    _check_k("k", k, d_sae)
    n = x.shape[0]
    c = min(d_sae, candidates or 4 * k)
    while True:
        values, indices, aux_values, aux_indices = topk_encode_aux(x, W_enc, b_enc, c, b_dec, dead_mask, k_aux,
                                                                   backend=backend)
        keep = _batch_selection(values.detach(), indices, k * n, d_sae)
        if c == d_sae or not bool(keep[:, -1].any()):
            break
        c = min(d_sae, 2 * c)
    row_offsets = torch_backend.row_offsets_from_counts(keep.sum(1))
    # Within a row, candidates are already in (value desc, index asc) order.
    return values[keep], indices[keep], row_offsets, aux_values, aux_indices


def _batch_selection(values, indices, budget, d_sae):
    """Mask of the ``budget`` best (row, candidate) pairs: value desc, then row-major flat index."""
    n, c = values.shape
    flat_ids = (torch.arange(n, device=values.device)[:, None] * d_sae + indices).reshape(-1)
    by_id = torch.argsort(flat_ids)
    by_value = torch.sort(values.reshape(-1)[by_id], descending=True, stable=True).indices
    chosen = by_id[by_value[:min(budget, n * c)]]
    keep = torch.zeros(n * c, dtype=torch.bool, device=values.device)
    keep[chosen] = True
    return keep.reshape(n, c)


# ----------------------------------------------------------------------------- variable-L0 encoders

def _dense_to_csr(codes, pattern):
    rows, cols = pattern.nonzero(as_tuple=True)
    return codes[rows, cols], cols, torch_backend.row_offsets_from_counts(pattern.sum(1))


class _ThresholdEncode(torch.autograd.Function):
    """CSR of pre where pre > cutoff; gradient flows to the stored pre values."""

    @staticmethod
    def forward(ctx, x, W, b, b_dec, cutoff, p):
        pre_values, indices, row_offsets = p.threshold_encode(x, W, b, b_dec, cutoff)
        ctx.save_for_backward(x, W, b_dec, indices, row_offsets)
        ctx.p = p
        ctx.mark_non_differentiable(indices, row_offsets)
        return pre_values, indices, row_offsets

    @staticmethod
    def backward(ctx, g_pre, _gi, _go):
        x, W, b_dec, indices, row_offsets = ctx.saved_tensors
        dx, dW, db, db_dec = _encoder_backward(ctx, ctx.p, [(g_pre.contiguous(), indices)], row_offsets, x, W, b_dec)
        return dx, dW, db, db_dec, None, None


def threshold_encode(x, W_enc, b_enc, cutoff, b_dec=None, backend=None):
    """CSR code of the pre-activations above a per-latent cutoff: (pre_values, indices, row_offsets)."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    cutoff = cutoff.expand(W_enc.shape[0]) if cutoff.dim() == 0 else cutoff
    _check_vector("cutoff", cutoff, W_enc.shape[0], "d_sae")
    name = resolve_backend(backend, x.device)
    if name == "reference":
        pre = reference.preactivations(x, W_enc, b_enc, b_dec)
        return _dense_to_csr(pre, pre > cutoff)
    return _ThresholdEncode.apply(x, W_enc.contiguous(), b_enc, b_dec, cutoff.contiguous().to(x.dtype),
                                  primitives(name))


def relu_encode(x, W_enc, b_enc, b_dec=None, backend=None):
    """ReLU SAE encode as CSR: (values, indices, row_offsets) of the positive pre-activations."""
    return threshold_encode(x, W_enc, b_enc, torch.zeros((), dtype=x.dtype, device=x.device), b_dec, backend)


class _JumpReLUGate(torch.autograd.Function):
    """values = pre * H(pre - t) and the per-row L0, with the rectangle-kernel
    straight-through gradient for the threshold t (bandwidth eps)."""

    @staticmethod
    def forward(ctx, pre, threshold, indices, row_offsets, bandwidth, p):
        t = threshold[indices]
        open_ = pre > t
        values = torch.where(open_, pre, 0)
        counts = torch.zeros(row_offsets.numel() - 1, dtype=pre.dtype, device=pre.device)
        if pre.numel():
            rows = torch_backend.csr_row_ids(row_offsets, pre.numel())
            counts = counts.index_add(0, rows, open_.to(pre.dtype))
        ctx.save_for_backward(pre, t, open_, indices, row_offsets)
        ctx.bandwidth, ctx.p, ctx.m = bandwidth, p, threshold.shape[0]
        return values, counts

    @staticmethod
    def backward(ctx, g_values, g_l0):
        pre, t, open_, indices, row_offsets = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = torch.where(open_, g_values, 0)
        near = ((pre - t).abs() < eps / 2).to(pre.dtype) / eps
        # d values/dt = -t/eps * rect((pre-t)/eps); d H/dt = -1/eps * rect((pre-t)/eps).
        g_t_entries = -near * t * g_values
        if g_l0 is not None:
            rows = torch_backend.csr_row_ids(row_offsets, pre.numel())
            g_t_entries = g_t_entries - near * g_l0[rows]
        g_threshold = _latent_sums(ctx.p, g_t_entries.contiguous(), indices, row_offsets, ctx.m)
        return g_pre, g_threshold, None, None, None, None


def jumprelu_encode(x, W_enc, b_enc, log_threshold, b_dec=None, bandwidth=1e-3, backend=None):
    """JumpReLU SAE encode: (values, indices, row_offsets, l0_per_row).

    The CSR pattern holds every pre-activation above threshold - bandwidth/2, so that the
    entries just below the threshold, which the straight-through gradient of the threshold
    needs, are present; their values are 0. ``l0_per_row`` counts the open latents and is
    differentiable with respect to ``log_threshold`` (for the L0 sparsity penalty).
    """
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    _check_vector("log_threshold", log_threshold, W_enc.shape[0], "d_sae")
    name = resolve_backend(backend, x.device)
    threshold = torch.exp(log_threshold)
    cutoff = (threshold - bandwidth / 2).detach()
    pre, indices, row_offsets = threshold_encode(x, W_enc, b_enc, cutoff, b_dec, backend=name)
    p = torch_backend if name == "reference" else primitives(name)
    values, l0 = _JumpReLUGate.apply(pre, threshold, indices, row_offsets, float(bandwidth), p)
    return values, indices, row_offsets, l0


class _GatedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, b_dec, r_mag, b_mag, p):
        mag, pi, indices, row_offsets = p.gated_encode(x, W, b, r_mag, b_mag, b_dec)
        ctx.save_for_backward(x, W, b_dec, r_mag, mag, pi, indices, row_offsets)
        ctx.p = p
        ctx.mark_non_differentiable(indices, row_offsets)
        return mag, pi, indices, row_offsets

    @staticmethod
    def backward(ctx, g_mag, g_pi, _gi, _go):
        x, W, b_dec, r_mag, mag, pi, indices, row_offsets = ctx.saved_tensors
        p, m = ctx.p, W.shape[0]
        scale = torch.exp(r_mag)[indices]
        g_mag = torch.zeros_like(mag) if g_mag is None else g_mag
        g_lin = torch.where(mag > 0, g_mag, 0)  # through relu(pi * exp(r_mag) + b_mag)
        g_pre = g_lin * scale
        if g_pi is not None:
            g_pre = g_pre + g_pi  # relu(pi) passes its gradient on the open pattern (pi > 0)
        dx, dW, db, db_dec = _encoder_backward(ctx, p, [(g_pre.contiguous(), indices)], row_offsets, x, W, b_dec)
        d_r_mag = _latent_sums(p, (g_lin * pi * scale).contiguous(), indices, row_offsets, m)
        d_b_mag = _latent_sums(p, g_lin.contiguous(), indices, row_offsets, m)
        return dx, dW, db, db_dec, d_r_mag, d_b_mag, None


def gated_encode(x, W_gate, b_gate, r_mag, b_mag, b_dec=None, backend=None):
    """Gated SAE encode from one GEMM: (magnitudes, relu_pi, indices, row_offsets), CSR.

    pi = (x - b_dec) W_gate^T + b_gate; the pattern is the open gate (pi > 0); magnitudes =
    relu(pi * exp(r_mag) + b_mag) are the features; relu_pi (= pi on the pattern) feeds the
    L1 penalty and the auxiliary reconstruction, which train the gate.
    """
    _check_encoder(x, W_gate, b_gate, b_dec, "W_gate", "b_gate")
    _check_vector("r_mag", r_mag, W_gate.shape[0], "d_sae")
    _check_vector("b_mag", b_mag, W_gate.shape[0], "d_sae")
    _check_same("x", x, r_mag=r_mag, b_mag=b_mag)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        f, pi_relu = reference.gated_codes(x, W_gate, b_gate, r_mag, b_mag, b_dec)
        pattern = reference.preactivations(x, W_gate, b_gate, b_dec) > 0
        mag, indices, row_offsets = _dense_to_csr(f, pattern)
        return mag, pi_relu[pattern], indices, row_offsets
    return _GatedEncode.apply(x, W_gate.contiguous(), b_gate, b_dec, r_mag, b_mag, primitives(name))


# ----------------------------------------------------------------------------- decode

class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, row_offsets, W, b_dec, p):
        ctx.save_for_backward(values, indices, row_offsets, W)
        ctx.p, ctx.has_bias = p, b_dec is not None
        if row_offsets is None:
            return p.gather(values, indices, W, b_dec)
        return p.csr_gather(values, indices, row_offsets, W, b_dec)

    @staticmethod
    def backward(ctx, g):
        values, indices, row_offsets, W = ctx.saved_tensors
        p, m = ctx.p, W.shape[0]
        g = g.contiguous()
        g_values = g_W = g_bias = None
        if ctx.needs_input_grad[0]:
            g_values = (p.gather_dot(g, indices, W) if row_offsets is None
                        else p.csr_gather_dot(g, indices, row_offsets, W))
        if ctx.needs_input_grad[3]:
            g_W = (p.scatter_add(values, indices, g, m) if row_offsets is None
                   else p.csr_scatter_add(values, indices, row_offsets, g, m))
        if ctx.has_bias and ctx.needs_input_grad[4]:
            g_bias = g.sum(0)
        return g_values, None, None, g_W, g_bias, None


def sparse_decode(values, indices, W_dec, b_dec=None, backend=None):
    """Decode a (values[N,k], indices[N,k]) code: x_hat[n] = sum_j v[n,j] W_dec[i[n,j]] + b_dec."""
    _check_code(values, indices, W_dec, "W_dec")
    _check_vector("b_dec", b_dec, W_dec.shape[1], "d_in")
    _check_same("W_dec", W_dec, b_dec=b_dec)
    name = resolve_backend(backend, values.device)
    if name == "reference":
        return reference.sparse_decode(values, indices, W_dec, b_dec)
    return _SparseDecode.apply(values.contiguous(), indices.contiguous(), None, W_dec.contiguous(), b_dec,
                               primitives(name))


def csr_decode(values, indices, row_offsets, W_dec, b_dec=None, backend=None):
    """Decode a CSR code (values[nnz], indices[nnz], row_offsets[N+1]); empty rows give b_dec."""
    _check_code(values, indices, W_dec, "W_dec", row_offsets)
    _check_vector("b_dec", b_dec, W_dec.shape[1], "d_in")
    _check_same("W_dec", W_dec, b_dec=b_dec)
    if row_offsets[-1] != values.numel():
        raise ValueError(f"row_offsets must end at nnz={values.numel()}, got {int(row_offsets[-1])}")
    name = resolve_backend(backend, values.device)
    if name == "reference":
        return reference.csr_decode(values, indices, row_offsets, W_dec, b_dec)
    return _SparseDecode.apply(values.contiguous(), indices.contiguous(), row_offsets.contiguous(),
                               W_dec.contiguous(), b_dec, primitives(name))


def matryoshka_decode(values, indices, row_offsets, W_dec, b_dec, sizes, backend=None):
    """Each prefix's reconstruction of a CSR code, [N, len(sizes), d_in]: prefix p decodes the
    entries with index < sizes[p]. One sparse decode does every prefix: each entry goes to the
    row (n, level), level = how many sizes its index reaches, and the levels' partial decodes
    are summed cumulatively (prefix p = levels 0..p), plus b_dec."""
    _check_code(values, indices, W_dec, "W_dec", row_offsets)
    _check_vector("b_dec", b_dec, W_dec.shape[1], "d_in")
    sizes = list(sizes)
    if not sizes or sizes[-1] != W_dec.shape[0] or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
        raise ValueError(f"sizes must increase strictly from >= 1 to d_sae={W_dec.shape[0]}, got {sizes}")
    sizes = torch.tensor(sizes, dtype=torch.long, device=values.device)
    levels, n = sizes.numel(), row_offsets.numel() - 1
    if resolve_backend(backend, values.device) == "reference":
        dense = reference.csr_to_dense(values, indices, row_offsets, W_dec.shape[0])
        return reference.matryoshka_decode(dense, W_dec, b_dec, sizes.tolist())
    level = torch.bucketize(indices, sizes, right=True)  # 0 .. levels - 1: every index is < d_sae
    rows = torch_backend.csr_row_ids(row_offsets, values.numel()) * levels + level
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=n * levels)
    offsets = torch_backend.row_offsets_from_counts(counts)
    parts = csr_decode(values[order], indices[order], offsets, W_dec, None, backend)
    out = parts.reshape(n, levels, -1).cumsum(1)
    return out if b_dec is None else out + b_dec
