"""Sparse autoencoders as nn.Modules built on ``fastsae.ops``.

Weights are stored latent-major: ``enc_weight`` is ``[d_sae, d_in]`` and ``W_dec``
``[d_sae, d_out]`` (d_out = d_in except for transcoders), so the encoder's backward and the
decoder share the same gather / scatter-add kernels. The seed names are kept: ``W_enc`` is a
``[d_in, d_sae]`` view of ``enc_weight``. Every kind of SAE is also a transcoder or skip
transcoder when its config says so (``SAEConfig.architecture``).

Every model offers two paths:

* the sparse path (``encode_sparse``, ``decode_sparse``, ``loss``), which never builds an
  N x d_sae tensor after the encoder and is what training and the runtime use;
* the seed API (``encode``, ``decode``, ``forward``), which returns dense features for
  code written against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastsae import ops, reference, torch_backend
from fastsae.config import SAEConfig


@dataclass
class SparseCode:
    """A latent code: fixed-k pairs (row_offsets is None) or CSR (row_offsets[N+1])."""

    values: torch.Tensor
    indices: torch.Tensor
    d_sae: int
    row_offsets: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.values.shape[0] if self.row_offsets is None else self.row_offsets.numel() - 1

    def to_dense(self) -> torch.Tensor:
        if self.row_offsets is None:
            return reference.to_dense(self.values, self.indices, self.d_sae)
        return reference.csr_to_dense(self.values, self.indices, self.row_offsets, self.d_sae)

    def row_ids(self) -> torch.Tensor:
        """The row of each stored entry (flattened order)."""
        if self.row_offsets is None:
            n, k = self.values.shape
            return torch.arange(n, device=self.values.device).repeat_interleave(k)
        return torch_backend.csr_row_ids(self.row_offsets, self.values.numel())

    def l0(self) -> torch.Tensor:
        """Number of non-zero latents per row (float)."""
        active = (self.values != 0).to(torch.float32).reshape(-1)
        out = torch.zeros(self.num_rows, device=self.values.device)
        return out.index_add_(0, self.row_ids(), active) if active.numel() else out

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values.reshape(-1), self.indices.reshape(-1)


class BaseSAE(nn.Module):
    """Common parameters, decoding and the seed API."""

    # Decoder rows per block of the gradient projection (remove_parallel_decoder_grad).
    PROJECTION_ROWS = 512

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        self.d_in, self.d_sae, self.d_out = config.d_in, config.d_sae, config.d_out
        gen = torch.Generator().manual_seed(config.seed)
        w_dec = torch.randn(self.d_sae, self.d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if self.d_out == self.d_in:
            # Encoder starts as the decoder's transpose: each latent first reads its own direction.
            w_enc = w_dec.clone()
        else:
            w_enc = torch.randn(self.d_sae, self.d_in, generator=gen)
            w_enc /= w_enc.norm(dim=1, keepdim=True)
        self.enc_weight = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if config.architecture == "skip_transcoder":
            # [d_out, d_in] as SAELens stores it; zero, so training starts from the plain transcoder.
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in))

    # ---- seed-compatible names
    @property
    def W_enc(self) -> torch.Tensor:
        """Encoder weight as [d_in, d_sae] (a view of the latent-major ``enc_weight``)."""
        return self.enc_weight.t()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def input_bias(self) -> torch.Tensor | None:
        """What the encoder subtracts from its input: an SAE's b_dec (it lives in the input
        space); None for a transcoder, whose b_dec lives in the output space (b_enc absorbs it)."""
        return None if self.config.is_transcoder else self.b_dec

    def _prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        return x.reshape(-1, self.d_in).to(self.dtype), lead

    def split_rows(self, rows: torch.Tensor, target: torch.Tensor | None = None):
        """(input [N, d_in], target [N, d_out]) of training rows. An SAE's target is its input. A
        transcoder's target is ``target`` or, when that is None, the rows' last d_out columns:
        paired sources serve [input | target] rows of width d_in + d_out."""
        if not self.config.is_transcoder:
            x, _ = self._prepare_input(rows)
            return x, x
        if target is None:
            width = self.d_in + self.d_out
            if rows.shape[-1] != width:
                raise ValueError(f"a transcoder's training rows are [input | target] of width d_in + d_out = {width}"
                                 f" (or pass target=), got shape {tuple(rows.shape)}")
            rows = rows.reshape(-1, width).to(self.dtype)
            return rows[:, :self.d_in], rows[:, self.d_in:]
        x, _ = self._prepare_input(rows)
        if target.shape[-1] != self.d_out or target.numel() // self.d_out != x.shape[0]:
            raise ValueError(f"target must have {x.shape[0]} rows of d_out={self.d_out}, got shape "
                             f"{tuple(target.shape)}")
        return x, target.reshape(-1, self.d_out).to(self.dtype)

    def input_part(self, rows: torch.Tensor) -> torch.Tensor:
        """The encoder's input of rows that may be a transcoder's paired [input | target] rows."""
        if self.config.is_transcoder and rows.shape[-1] == self.d_in + self.d_out:
            return rows[..., :self.d_in]
        return rows

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """A skip transcoder's linear term x W_skip^T; None for the other architectures."""
        return x @ self.W_skip.t() if self.config.architecture == "skip_transcoder" else None

    def output(self, x: torch.Tensor, code: "SparseCode") -> torch.Tensor:
        """The prediction from input rows x and their code: the decode, plus the skip term."""
        out = self.decode_sparse(code)
        skip = self.skip(x)
        return out if skip is None else out + skip

    # ---- the sparse path
    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        raise NotImplementedError

    def decode_sparse(self, code: SparseCode) -> torch.Tensor:
        if code.row_offsets is None:
            return ops.sparse_decode(code.values, code.indices, self.W_dec, self.b_dec)
        return ops.csr_decode(code.values, code.indices, code.row_offsets, self.W_dec, self.b_dec)

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, sparsity_scale: float = 1.0,
             target: torch.Tensor | None = None) -> dict:
        """Training losses on a batch (rows as ``split_rows`` reads them); ``total_loss`` is what
        to minimise, ``reconstruction`` the prediction of the target."""
        x, target = self.split_rows(x, target)
        code = self.encode_sparse(x)
        return self._metrics(target, self.output(x, code), code, {})

    def _metrics(self, target, recon, code, extra) -> dict:
        mse, fvu = reference.mse_and_fvu(recon, target)
        out = {"mse_loss": mse, "fvu": fvu, "l0": code.l0().mean(),
               "reconstruction": recon, "code": code}
        out.update(extra)
        out["total_loss"] = mse + sum(v for k, v in extra.items() if k.endswith("_term"))
        return out

    # ---- the seed API
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features [..., d_sae]."""
        x2, lead = self._prepare_input(x)
        return self.encode_sparse(x2).to_dense().reshape(*lead, self.d_sae)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Decode dense features [..., d_sae] (a skip transcoder's skip term needs the input:
        see ``output``)."""
        return features.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        """(reconstruction, dense features, metrics) with mse_loss, l0, total_loss (+ l1_loss).
        A transcoder predicts its target from x [..., d_in]; the metrics compare the prediction
        with ``target`` when given (with itself otherwise: zero error)."""
        x2, lead = self._prepare_input(x)
        if self.config.is_transcoder and target is None:
            code = self.encode_sparse(x2)
            recon = self.output(x2, code)
            out = self._metrics(recon.detach(), recon, code, {})
        else:
            out = self.loss(x2, target=None if target is None else target.reshape(-1, self.d_out))
        metrics = {k: v for k, v in out.items() if k not in ("reconstruction", "code")}
        features = out["code"].to_dense().reshape(*lead, self.d_sae)
        return out["reconstruction"].reshape(*lead, self.d_out), features, metrics

    @torch.no_grad()
    def get_feature_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def latent_activations(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
        """[N, E] features of the latents ``latents`` ([E] ids) for input rows x [N, d_in], from
        those latents' encoder rows alone: ``encode_sparse(x)``'s values there, up to the rounding
        of the dot products' order. None where a latent's feature depends on the other latents
        (TopK: the row's k-th value decides; BatchTopK while training: the batch's)."""
        return None

    def _latent_preactivations(self, x, latents):
        xc = x if self.input_bias is None else x - self.input_bias
        return torch.addmm(self.b_enc[latents], xc, self.enc_weight[latents].t())

    @torch.no_grad()
    def normalize_decoder_weights(self) -> None:
        """Scale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row, so a step at unit
        norm moves along the sphere rather than changing the norm."""
        g = self.W_dec.grad
        if g is None:
            return
        # g - (g.W / W.W) W in place, by row dots over blocks of rows on CPU: a block's products
        # stay in cache, where whole-matrix ones are fresh [d_sae, d] allocations each step (1.7
        # vs 3.8 ms median in the training step at d_sae 6144, d 384; 2-core AMD EPYC). A GPU
        # takes the whole matrix at once: blocks would only add kernel launches.
        W = self.W_dec.detach()
        rows = self.PROJECTION_ROWS if W.device.type == "cpu" else max(1, W.shape[0])
        for start in range(0, W.shape[0], rows):
            g_rows, W_rows = g[start:start + rows], W[start:start + rows]
            along = torch.linalg.vecdot(g_rows, W_rows) / torch.linalg.vecdot(W_rows, W_rows).clamp_min(1e-24)
            g_rows.addcmul_(W_rows, along.unsqueeze(1), value=-1)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def _aux_k(self, dead_mask, max_aux_k):
        """AuxK slots per token: config.aux_k, at most d_sae and at most ``max_aux_k`` (the
        caller's count of dead latents: slots beyond it would only hold zeros); 0 = off."""
        if dead_mask is None or self.config.aux_k_coefficient <= 0:
            return 0
        return min(self.config.aux_k, self.d_sae, self.d_sae if max_aux_k is None else max_aux_k)

    def _auxk_terms(self, target, recon, aux_values, aux_indices, dead_mask):
        residual = (target - recon).detach()
        aux_recon = ops.sparse_decode(aux_values, aux_indices, self.W_dec)
        aux = reference.auxk_loss(aux_recon, residual)
        # No dead latents means nothing to revive: the term vanishes instead of adding noise.
        aux = torch.where(dead_mask.any(), aux, torch.zeros_like(aux))
        aux = torch.nan_to_num(aux, nan=0.0)
        return {"aux_loss": aux.detach(), "aux_term": self.config.aux_k_coefficient * aux}


class TopKSAE(BaseSAE):
    """TopK SAE: keep the k largest ReLU pre-activations per token; AuxK revives dead latents."""

    def encode_sparse(self, x):
        values, indices, _, _ = ops.topk_encode_aux(x, self.enc_weight, self.b_enc, self.config.k, self.input_bias)
        return SparseCode(values, indices, self.d_sae)

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, max_aux_k=None, target=None):
        x, target = self.split_rows(x, target)
        k_aux = self._aux_k(dead_mask, max_aux_k)
        use_aux = k_aux > 0
        values, indices, aux_values, aux_indices = ops.topk_encode_aux(
            x, self.enc_weight, self.b_enc, self.config.k, self.input_bias, dead_mask if use_aux else None, k_aux)
        code = SparseCode(values, indices, self.d_sae)
        recon = self.output(x, code)
        extra = {}
        if k_aux:
            extra = self._auxk_terms(target, recon, aux_values, aux_indices, dead_mask)
        return self._metrics(target, recon, code, extra)

class BatchTopKSAE(TopKSAE):
    """BatchTopK: the N*k largest activations across the batch while training; at inference a
    per-token threshold learned during training (so a token's code does not depend on its batch)."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(()))

    def encode_sparse(self, x):
        return self._encode(x)[0]

    def _encode(self, x, dead_mask=None, k_aux=0):
        """The code and, while training with a dead mask, the AuxK selection from the same pass."""
        if self.training:
            values, indices, row_offsets, aux_values, aux_indices = ops.batch_topk_encode_aux(
                x, self.enc_weight, self.b_enc, self.config.k, self.input_bias, dead_mask, k_aux)
            self._update_threshold(values)
        else:
            values, indices, row_offsets = ops.threshold_encode(x, self.enc_weight, self.b_enc,
                                                                self.threshold.to(x.dtype), self.input_bias)
            aux_values = aux_indices = None
            if k_aux:
                _, _, aux_values, aux_indices = ops.topk_encode_aux(x, self.enc_weight, self.b_enc, 1, self.input_bias,
                                                                    dead_mask, k_aux)
        return SparseCode(values, indices, self.d_sae, row_offsets), aux_values, aux_indices

    @torch.no_grad()
    def _update_threshold(self, values):
        """EMA (0.99) of the batch's smallest selected activation. The first batch sets it
        outright (a threshold <= 0 means none yet): an EMA started at 0 would reach only 63% of
        its value in 100 steps, and a short run's SAE would then keep too many latents."""
        positive = values[values > 0]
        if positive.numel():
            smallest = positive.min().to(self.threshold.dtype)
            self.threshold.copy_(torch.where(self.threshold > 0, 0.99 * self.threshold + 0.01 * smallest, smallest))

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor) -> None:
        """Set the inference threshold to the smallest activation a batch top-k over ``x``
        selects, so that inference keeps k latents per token on average over x. (The EMA of
        the training batches' minima lags on short runs: a 178-step run kept L0 19.7 at k 32.)
        ``x`` is input rows or training rows (``split_rows``)."""
        x, _ = self._prepare_input(self.input_part(x))
        values = ops.batch_topk_encode(x, self.enc_weight, self.b_enc, self.config.k, self.input_bias)[0]
        positive = values[values > 0]
        if positive.numel():
            self.threshold.copy_(positive.min().to(self.threshold.dtype))

    def latent_activations(self, x, latents):
        if self.training:  # the batch's N*k-th value decides
            return None
        pre = self._latent_preactivations(x, latents)
        return torch.where(pre > self.threshold.to(pre.dtype), pre, 0)

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, max_aux_k=None, target=None):
        x, target = self.split_rows(x, target)
        k_aux = self._aux_k(dead_mask, max_aux_k)
        use_aux = k_aux > 0
        code, aux_values, aux_indices = self._encode(x, dead_mask if use_aux else None, k_aux)
        recon = self.output(x, code)
        extra = self._auxk_terms(target, recon, aux_values, aux_indices, dead_mask) if k_aux else {}
        return self._metrics(target, recon, code, extra)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025): BatchTopK whose dictionary prefixes
    (``config.matryoshka_sizes``) must each reconstruct the input on their own; the loss adds
    every inner prefix's MSE to the full one. Encoding and inference are BatchTopK's."""

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, max_aux_k=None, target=None):
        x, target = self.split_rows(x, target)
        k_aux = self._aux_k(dead_mask, max_aux_k)
        code, aux_values, aux_indices = self._encode(x, dead_mask if k_aux else None, k_aux)
        prefixes = self.prefix_reconstructions(code)
        skip = self.skip(x)
        if skip is not None:
            prefixes = prefixes + skip[:, None]
        recon = prefixes[:, -1]
        extra = self._auxk_terms(target, recon, aux_values, aux_indices, dead_mask) if k_aux else {}
        for size, inner in zip(self.config.matryoshka_sizes[:-1], prefixes.unbind(1)):
            extra[f"prefix_{size}_term"], extra[f"prefix_{size}_fvu"] = reference.mse_and_fvu(inner, target)
        return self._metrics(target, recon, code, extra)

    def prefix_reconstructions(self, code: SparseCode) -> torch.Tensor:
        """[N, len(matryoshka_sizes), d_out]: the decode by each prefix of the dictionary (a skip
        transcoder's skip term not included)."""
        if code.row_offsets is None:  # fixed-k pairs as CSR
            n, k = code.values.shape
            code = SparseCode(code.values.reshape(-1), code.indices.reshape(-1), code.d_sae,
                              torch.arange(n + 1, device=code.values.device) * k)
        return ops.matryoshka_decode(code.values, code.indices, code.row_offsets, self.W_dec, self.b_dec,
                                     self.config.matryoshka_sizes)


class ReLUSAE(BaseSAE):
    """ReLU SAE with an L1 penalty weighted by decoder row norms."""

    def encode_sparse(self, x):
        values, indices, row_offsets = ops.relu_encode(x, self.enc_weight, self.b_enc, self.input_bias)
        return SparseCode(values, indices, self.d_sae, row_offsets)

    def latent_activations(self, x, latents):
        pre = self._latent_preactivations(x, latents)
        return torch.where(pre > 0, pre, 0)

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, target=None):
        x, target = self.split_rows(x, target)
        code = self.encode_sparse(x)
        recon = self.output(x, code)
        l1 = (code.values * self.decoder_norms()[code.indices]).sum() / x.shape[0]
        coef = self.config.l1_coefficient * sparsity_scale
        return self._metrics(target, recon, code, {"l1_loss": l1.detach(), "l1_term": coef * l1})


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE: per-latent learned threshold, L0 penalty through a straight-through estimator
    (with ``config.target_l0``, a penalty on the squared relative miss of that mean L0)."""

    def __init__(self, config):
        super().__init__(config)
        init = torch.full((self.d_sae,), float(config.jumprelu_init_threshold))
        self.log_threshold = nn.Parameter(init.log())

    def _encode(self, x):
        return ops.jumprelu_encode(x, self.enc_weight, self.b_enc, self.log_threshold.to(x.dtype), self.input_bias,
                                   bandwidth=self.config.jumprelu_bandwidth)

    def encode_sparse(self, x):
        values, indices, row_offsets, _ = self._encode(x)
        return SparseCode(values, indices, self.d_sae, row_offsets)

    def latent_activations(self, x, latents):
        pre = self._latent_preactivations(x, latents)
        return torch.where(pre > torch.exp(self.log_threshold.to(x.dtype))[latents], pre, 0)

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, max_aux_k=None, target=None):
        x, target = self.split_rows(x, target)
        values, indices, row_offsets, l0 = self._encode(x)
        code = SparseCode(values, indices, self.d_sae, row_offsets)
        recon = self.output(x, code)
        coef = self.config.l0_coefficient * sparsity_scale
        l0 = l0.mean()
        goal = self.config.target_l0
        sparsity = l0 if goal is None else (l0 / goal - 1) ** 2
        extra = {"l0_loss": l0.detach(), "l0_term": coef * sparsity}
        k_aux = self._aux_k(dead_mask, max_aux_k)
        if k_aux:  # a dead latent has no entry near its threshold, so nothing else reaches it
            aux_values, aux_indices = ops.dead_topk_encode(x, self.enc_weight, self.b_enc, dead_mask, k_aux,
                                                           self.input_bias)
            extra.update(self._auxk_terms(target, recon, aux_values, aux_indices, dead_mask))
        return self._metrics(target, recon, code, extra)


class GatedSAE(BaseSAE):
    """Gated SAE: a shared gate GEMM; magnitudes rescale it per latent (r_mag, b_mag).

    The gate is trained by an L1 penalty on relu(pi) (weighted by decoder norms) and by an
    auxiliary reconstruction of relu(pi) through the detached decoder, so every parameter,
    the gate's included, gets a gradient.
    """

    def __init__(self, config):
        super().__init__(config)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    @property
    def W_gate(self):
        return self.enc_weight

    @property
    def b_gate(self):
        return self.b_enc

    def _encode(self, x):
        return ops.gated_encode(x, self.enc_weight, self.b_enc, self.r_mag, self.b_mag, self.input_bias)

    def encode_sparse(self, x):
        mag, _, indices, row_offsets = self._encode(x)
        return SparseCode(mag, indices, self.d_sae, row_offsets)

    def latent_activations(self, x, latents):
        pi = self._latent_preactivations(x, latents)
        return torch.where(pi > 0, torch.relu(pi * torch.exp(self.r_mag[latents]) + self.b_mag[latents]), 0)

    def loss(self, x, dead_mask=None, sparsity_scale=1.0, target=None):
        x, target = self.split_rows(x, target)
        mag, pi, indices, row_offsets = self._encode(x)
        code = SparseCode(mag, indices, self.d_sae, row_offsets)
        recon = self.output(x, code)
        l1 = (pi * self.decoder_norms()[indices]).sum() / x.shape[0]
        aux_recon = ops.csr_decode(pi, indices, row_offsets, self.W_dec.detach(), self.b_dec.detach())
        skip = self.skip(x)
        if skip is not None:
            aux_recon = aux_recon + skip.detach()
        aux = reference.mse(aux_recon, target)
        coef = self.config.l1_coefficient * sparsity_scale
        return self._metrics(target, recon, code, {"l1_loss": l1.detach(), "l1_term": coef * l1,
                                                   "aux_loss": aux.detach(), "aux_term": aux})


SAE_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
               "relu": ReLUSAE, "jumprelu": JumpReLUSAE, "gated": GatedSAE}


def create_sae(config: SAEConfig) -> BaseSAE:
    """Build the SAE class that ``config.activation`` names."""
    if config.activation not in SAE_CLASSES:
        raise ValueError(f"config.activation must be one of {tuple(SAE_CLASSES)}, got {config.activation!r}")
    return SAE_CLASSES[config.activation](config)
