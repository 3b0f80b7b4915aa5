"""Input normalisation and decoder-bias initialisation for training.

Training sees ``x' = s * x`` with ``s`` chosen so that ``E||x'||^2 = d_in``; this keeps
learning rates and the L1/L0 coefficients meaningful whatever the scale of a model's
residual stream. The saved SAE must work on raw activations, so ``s`` is folded into its
weights (see ``fold_normalization``).
"""
from __future__ import annotations

import torch


def finite_rows(sample: torch.Tensor) -> torch.Tensor:
    """The rows of ``sample`` without NaN/Inf (a bad row is caught, with its step, while training)."""
    keep = torch.isfinite(sample).all(dim=1)
    if not bool(keep.any()):
        raise ValueError("every sampled activation row contains NaN or Inf; cannot estimate the input scale")
    return sample[keep]


OUTLIER_NORM_RATIO = 1000.0  # rows this many times the median norm are left out of the scale


def estimate_norm_scale(sample: torch.Tensor) -> float:
    """s with mean ||s x||^2 = d_in over the sample, in float64.

    Rows whose norm exceeds OUTLIER_NORM_RATIO x the median are left out: a single absurd row
    (1e19, say) would otherwise set the scale alone and shrink every other row to zero. Real
    outliers (BOS tokens, tens of times the median) stay in the mean. Training still sees the
    absurd rows, and stops with an error if their loss overflows.
    """
    sq_norms = finite_rows(sample).double().pow(2).sum(dim=1)
    median = sq_norms.median()
    kept = sq_norms[sq_norms <= median * OUTLIER_NORM_RATIO**2] if median > 0 else sq_norms
    mean_sq = kept.mean().item() if kept.numel() else 0.0
    if not mean_sq > 0:
        raise ValueError("the activation sample is all zeros; cannot normalise it")
    return (sample.shape[1] / mean_sq) ** 0.5


def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to ``points`` (Weiszfeld's algorithm).

    A better b_dec start than the mean: it is robust to the few huge-norm outlier tokens
    (e.g. BOS) that residual streams have.
    """
    points = finite_rows(points.float())
    y = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(eps)
        y_next = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (y_next - y).norm() <= eps * (1 + y.norm()):
            return y_next
        y = y_next
    return y


@torch.no_grad()
def fold_normalization(sae, scale: float, output_scale: float | None = None) -> None:
    """Make an SAE trained on ``scale * x`` work on raw ``x``, in place.

    Trained: f = act(W_enc (s x - b_dec) + b_enc), recon' = f W_dec + b_dec, on x' = s x.
    Wanted: recon(x) = recon'(s x) / s with the same codes f. Since
    W_enc (s x - b_dec) = (s W_enc)(x - b_dec / s), set W_enc <- s W_enc, b_dec <- b_dec / s,
    W_dec <- W_dec / s. Codes (and so L0, thresholds, gates) are unchanged; decoder rows get
    norm 1/s.

    A transcoder trained on (s x, t y) (t = ``output_scale``) has no b_dec in its encoder and
    predicts t y: W_enc <- s W_enc, W_dec <- W_dec / t, b_dec <- b_dec / t, and a skip
    transcoder's W_skip <- W_skip s / t.
    """
    output_scale = scale if output_scale is None else output_scale
    sae.enc_weight.mul_(scale)
    sae.W_dec.div_(output_scale)
    sae.b_dec.div_(output_scale)
    if hasattr(sae, "W_skip"):
        sae.W_skip.mul_(scale / output_scale)


@torch.no_grad()
def unfold_normalization(sae, scale: float, output_scale: float | None = None) -> None:
    """Undo ``fold_normalization`` (back to the training parametrisation)."""
    fold_normalization(sae, 1.0 / scale, None if output_scale is None else 1.0 / output_scale)
