"""Evaluating an SAE: reconstruction and sparsity metrics, and the downstream loss when its
reconstruction is spliced into the model.

Every metric is on the scale training reports (``fastsae.reference``): ``mse_loss`` is the
elementwise mean squared error and ``fvu`` the fraction of variance unexplained. Metrics are
accumulated as exact sums over batches (float64), so the batch size never changes a number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fastsae import ops
from fastsae.config import SAEConfig
from fastsae.models import BaseSAE, SparseCode

# A latent active on more than this fraction of tokens counts as "dense" (too frequent to be
# a specific feature); the usual threshold in SAE evaluations.
DENSE_THRESHOLD = 0.1


@dataclass
class SAEMetrics:
    """Evaluation metrics.

    ``explained_variance`` = ``reconstruction_score`` = 1 - fvu (the seed defined both as
    1 - MSE / variance; fastsae does not clamp them at 0, so a bad SAE shows as negative).
    ``mean_activation`` is the mean of the non-zero latent activations. ``density`` is
    the per-latent firing frequency; ``density_histogram`` bins log10 of the live ones.
    """

    mse_loss: float
    explained_variance: float
    reconstruction_score: float
    l0_mean: float
    l0_std: float
    l1_mean: float
    dead_latent_fraction: float
    max_activation: float
    mean_activation: float
    fvu: float = float("nan")
    cosine_similarity: float = float("nan")
    dense_fraction: float = float("nan")
    num_tokens: int = 0
    density_histogram: dict = field(default_factory=dict)
    loss_recovered: dict | None = None
    # Matryoshka SAEs: {prefix width: FVU of that prefix's reconstruction}
    prefix_fvu: dict | None = None
    density: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("density")
        return out

    def __str__(self) -> str:
        lines = [f"tokens               {self.num_tokens}",
                 f"mse_loss             {self.mse_loss:.6g}",
                 f"fvu                  {self.fvu:.4f}  (explained variance {self.explained_variance:.4f})",
                 f"cosine_similarity    {self.cosine_similarity:.4f}",
                 f"l0                   {self.l0_mean:.2f} +- {self.l0_std:.2f}",
                 f"l1_mean              {self.l1_mean:.4g}",
                 f"dead latents         {100 * self.dead_latent_fraction:.2f}%",
                 f"dense latents        {100 * self.dense_fraction:.2f}% (> {DENSE_THRESHOLD:.0%} of tokens)",
                 f"max / mean activation {self.max_activation:.4g} / {self.mean_activation:.4g}"]
        if self.prefix_fvu:
            lines.append("prefix fvu           " + ", ".join(f"{w}: {f:.4f}" for w, f in self.prefix_fvu.items()))
        if self.loss_recovered:
            lr = self.loss_recovered
            lines.append(f"loss recovered       {lr['fraction_recovered']:.4f} ({lr['kind']}: clean "
                         f"{lr['loss_clean']:.4g}, sae {lr['loss_sae']:.4g}, zero {lr['loss_zero']:.4g})")
        return "\n".join(lines)


def density_histogram(density: torch.Tensor, num_tokens: int, bins: int = 40) -> dict:
    """Histogram of log10 firing frequency of live latents; dead ones are counted apart."""
    live = density[density > 0].double()
    low = np.floor(np.log10(1.0 / max(num_tokens, 1)))
    counts, edges = np.histogram(live.log10().numpy(), bins=bins, range=(min(low, -1.0), 0.0))
    return {"log10_density_edges": edges.tolist(), "counts": counts.tolist(),
            "dead": int((density == 0).sum())}


def _check_activations(x: torch.Tensor, d_in: int) -> None:
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"activations must have shape [N, d_in={d_in}], got {tuple(x.shape)}")
    if not bool(ops.all_finite(x)):
        raise ValueError("activations contain NaN or Inf")


class _Sums:
    """Exact running sums (float64, on the SAE's device) from which every metric follows; read
    back once at the end, so a GPU evaluation never waits on the host per batch."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.n = 0
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sum_x, self.sum_x2, self.counts = zeros(d_in), zeros(d_in), zeros(d_sae)
        # sse, cos, l0, l0^2, l1, sum of active values
        self.scalars = zeros(6)
        self.max_act = zeros(())
        self.prefix_sse: torch.Tensor | None = None  # per Matryoshka prefix

    def add_prefixes(self, x: torch.Tensor, prefixes: torch.Tensor) -> None:
        """Squared errors of each prefix's reconstruction ([N, prefixes, d_in])."""
        sse = (prefixes.double() - x.double()[:, None]).pow(2).sum((0, 2))
        self.prefix_sse = sse if self.prefix_sse is None else self.prefix_sse + sse

    def add(self, x: torch.Tensor, recon: torch.Tensor, code: SparseCode) -> None:
        x64, r64 = x.double(), recon.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_x2 += x64.pow(2).sum(0)
        values, indices = code.flat()
        values = values.detach().double()
        active = values != 0
        l0 = code.l0().double()
        self.scalars += torch.stack([(r64 - x64).pow(2).sum(), F.cosine_similarity(r64, x64, dim=1).sum(),
                                     l0.sum(), l0.pow(2).sum(), values.abs().sum(), values[active].sum()])
        self.max_act = torch.maximum(self.max_act, values.max() if values.numel() else self.max_act)
        self.counts += torch.bincount(indices[active].long(), minlength=self.counts.numel()).double()

    def metrics(self, d_in: int, compute_dead_latents: bool, prefix_sizes=None) -> SAEMetrics:
        n = max(self.n, 1)
        total_var = (self.sum_x2 - self.sum_x.pow(2) / n).sum().item()
        prefix_fvu = None
        if self.prefix_sse is not None and total_var > 0:
            prefix_fvu = {int(w): e / total_var for w, e in zip(prefix_sizes, self.prefix_sse.tolist())}
        sse, cos, l0, l0_sq, l1, active_sum = self.scalars.tolist()
        fvu = sse / total_var if total_var > 0 else float("nan")
        l0_mean = l0 / n
        l0_var = (l0_sq - n * l0_mean ** 2) / (n - 1) if n > 1 else 0.0
        num_active = self.counts.sum().item()
        density = (self.counts / n).float().cpu()
        return SAEMetrics(
            mse_loss=sse / (n * d_in), explained_variance=1.0 - fvu, reconstruction_score=1.0 - fvu,
            l0_mean=l0_mean, l0_std=max(l0_var, 0.0) ** 0.5, l1_mean=l1 / n,
            dead_latent_fraction=(density == 0).double().mean().item() if compute_dead_latents else 0.0,
            max_activation=self.max_act.item(), mean_activation=active_sum / num_active if num_active else 0.0,
            fvu=fvu, cosine_similarity=cos / n,
            dense_fraction=(density > DENSE_THRESHOLD).double().mean().item(), num_tokens=self.n,
            density_histogram=density_histogram(density, self.n), prefix_fvu=prefix_fvu, density=density)


def reconstruct(sae: BaseSAE, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
    """(reconstruction, code) of rows x [N, d_in] in the SAE's dtype and device (a
    transcoder's prediction of its target, [N, d_out])."""
    x = x.to(device=sae.device, dtype=sae.dtype)
    code = sae.encode_sparse(x)
    return sae.output(x, code), code


def _inputs_and_targets(sae: BaseSAE, activations: torch.Tensor, targets: torch.Tensor | None):
    """(inputs [N, d_in], targets [N, d_out]) to evaluate on: an SAE's targets are its inputs; a
    transcoder's come as ``targets`` or as the last d_out columns of paired rows."""
    if not sae.config.is_transcoder:
        _check_activations(activations, sae.d_in)
        return activations, activations
    if targets is None:
        _check_activations(activations, sae.d_in + sae.d_out)
        return activations[:, :sae.d_in], activations[:, sae.d_in:]
    _check_activations(activations, sae.d_in)
    _check_activations(targets, sae.d_out)
    if targets.shape[0] != activations.shape[0]:
        raise ValueError(f"targets must have one row per activation row ({activations.shape[0]}), "
                         f"got {targets.shape[0]}")
    return activations, targets



class _EvalMode:
    """Run an SAE in eval mode (BatchTopK then uses its inference threshold), then restore."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


class SAEEvaluator:
    """Seed-compatible evaluator: ``evaluate`` for metrics, plus per-feature analysis."""

    def __init__(self, sae: BaseSAE, config: SAEConfig | None = None):
        self.sae = sae
        self.config = config or sae.config

    @torch.no_grad()
    def evaluate(self, activations: torch.Tensor, batch_size: int = 4096,
                 compute_dead_latents: bool = True, targets: torch.Tensor | None = None) -> SAEMetrics:
        """Metrics over every row of ``activations`` [N, d_in]. A transcoder is measured against
        its target: ``targets`` [N, d_out], or paired rows [N, d_in + d_out] as activations."""
        inputs, targets = _inputs_and_targets(self.sae, activations, targets)
        if inputs.shape[0] == 0:
            raise ValueError("activations is empty")
        sae = self.sae
        sums = _Sums(sae.d_out, sae.d_sae, sae.device)
        with _EvalMode(sae):
            for start in range(0, inputs.shape[0], batch_size):
                x = inputs[start:start + batch_size].to(device=sae.device, dtype=sae.dtype)
                y = targets[start:start + batch_size].to(device=sae.device, dtype=sae.dtype)
                recon, code = reconstruct(sae, x)
                sums.add(y, recon, code)
                if hasattr(sae, "prefix_reconstructions"):
                    prefixes = sae.prefix_reconstructions(code)
                    skip = sae.skip(x)
                    sums.add_prefixes(y, prefixes if skip is None else prefixes + skip[:, None])
        return sums.metrics(sae.d_out, compute_dead_latents, getattr(sae.config, "matryoshka_sizes", None))

    @torch.no_grad()
    def feature_activations(self, feature_idx: int, activations: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Activation of one latent on every row [N], without a dense N x d_sae tensor."""
        if not 0 <= feature_idx < self.sae.d_sae:
            raise ValueError(f"feature_idx must be in [0, {self.sae.d_sae}), got {feature_idx}")
        out = []
        activations = self.sae.input_part(activations)
        with _EvalMode(self.sae):
            for start in range(0, activations.shape[0], batch_size):
                _, code = reconstruct(self.sae, activations[start:start + batch_size])
                values, indices = code.flat()
                hit = indices == feature_idx
                col = torch.zeros(code.num_rows, dtype=torch.float32, device=values.device)
                out.append(col.index_add_(0, code.row_ids()[hit], values[hit].float()).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def get_top_activating_examples(self, feature_idx: int, activations: torch.Tensor, k: int = 10,
                                    batch_size: int = 4096) -> torch.Tensor:
        """Row indices of the k rows where the latent is largest (descending)."""
        acts = self.feature_activations(feature_idx, activations, batch_size)
        return torch.topk(acts, min(k, acts.numel())).indices

    def analyze_feature(self, feature_idx: int, activations: torch.Tensor, batch_size: int = 4096) -> dict:
        acts = self.feature_activations(feature_idx, activations, batch_size)
        active = acts[acts > 0]
        return {"activation_frequency": (acts > 0).float().mean().item(),
                "mean_activation": acts.mean().item(),
                "mean_when_active": active.mean().item() if active.numel() else 0.0,
                "max_activation": acts.max().item() if acts.numel() else 0.0,
                "std_activation": acts.std().item() if acts.numel() > 1 else 0.0}

    def get_feature_dashboard_data(self, feature_idx: int, activations: torch.Tensor, top_k: int = 10) -> dict:
        acts = self.feature_activations(feature_idx, activations)
        top = torch.topk(acts, min(top_k, acts.numel()))
        return {"feature_idx": feature_idx, "statistics": self.analyze_feature(feature_idx, activations),
                "top_activating_indices": top.indices.tolist(), "top_activations": top.values.tolist()}


# ----------------------------------------------------------------------------- downstream loss

def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) of a token-id tensor, a dict, a TokenBatch or an (x, y) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    if hasattr(batch, "input_ids"):
        return batch.input_ids, getattr(batch, "attention_mask", None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    raise TypeError(f"batch of type {type(batch).__name__}: expected token ids, a dict or a TokenBatch")


def _sae_replacement(sae: BaseSAE):
    def replace(x):
        recon, _ = reconstruct(sae, x.reshape(-1, x.shape[-1]))
        return recon.to(x.dtype).reshape(x.shape)
    return replace


class _TranscoderSplice:
    """Hooks that put a transcoder's prediction in place of its output hook point's activation:
    one reads the input hook point (earlier in the same forward), the other replaces the output."""

    def __init__(self, sae: BaseSAE, read: tuple, write: tuple):
        self.sae, self.read, self.write, self.x = sae, read, write, None

    def _keep_input(self, x):
        self.x = x.reshape(-1, x.shape[-1])

    def _predict(self, y):
        if self.x is None:
            raise RuntimeError(f"the transcoder's output hook point {self.sae.config.output_hook_point!r} ran before "
                               f"its input {self.sae.config.hook_point!r}: a transcoder predicts a later activation")
        recon, _ = reconstruct(self.sae, self.x)
        self.x = None
        return recon.to(y.dtype).reshape(y.shape)

    def add(self):
        from fastsae.hooks import add_hook

        return [add_hook(*self.read, self._keep_input), add_hook(*self.write, self._predict)]


def _output_kind(output) -> str:
    if isinstance(output, torch.Tensor) or getattr(output, "logits", None) is not None:
        return "ce"
    if getattr(output, "last_hidden_state", None) is not None:
        return "embedding"
    raise TypeError(f"cannot tell what the model's output {type(output).__name__} is: expected logits "
                    "(a Tensor or .logits) or .last_hidden_state")


def _ce_sums(output, input_ids, mask) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions where both token and next token are real."""
    logits = output if isinstance(output, torch.Tensor) else output.logits
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    return ce[valid.flatten()].double().sum().item(), int(valid.sum())


def _pooled(output, mask) -> torch.Tensor:
    """Mean-pooled sentence embedding (the sentence-transformers pooling for MiniLM)."""
    hidden = output.last_hidden_state.float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def loss_recovered(model: torch.nn.Module, sae: BaseSAE, hook_point: str | None, batches: Iterable,
                   kind: str = "auto") -> dict:
    """Fraction of loss recovered when the SAE reconstruction replaces the activation at the hook.

    fraction = (L_zero - L_sae) / (L_zero - L_clean), with L_zero the loss when the hook's
    activation is zeroed. A transcoder's prediction (from ``hook_point``, default its own input)
    replaces its output hook point (e.g. the MLP's output), which is what is zeroed. ``kind``:

    - "ce": causal LMs (output is logits): mean next-token cross-entropy over real tokens;
    - "embedding": encoders such as MiniLM (output has last_hidden_state): the loss is the mean
      over sentences of 1 - cos(pooled embedding, clean pooled embedding), so L_clean = 0;
    - "auto": "ce" when the model returns logits, else "embedding".
    """
    from fastsae.hooks import add_hook, forward_tokens, model_device, resolve_hook_point

    if kind not in ("auto", "ce", "embedding"):
        raise ValueError(f"kind must be 'auto', 'ce' or 'embedding', got {kind!r}")
    module, hook_kind = resolve_hook_point(model, hook_point or sae.config.hook_point)
    if sae.config.is_transcoder:
        target = resolve_hook_point(model, sae.config.output_hook_point)
        splice = _TranscoderSplice(sae, (module, hook_kind), target).add
        module, hook_kind = target
    else:
        splice = lambda: [add_hook(module, hook_kind, _sae_replacement(sae))]  # noqa: E731
    device = model_device(model)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    with _EvalMode(sae):
        for batch in batches:
            input_ids, mask = _unpack(batch)
            input_ids = input_ids.to(device)
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            clean = forward_tokens(model, input_ids, mask)
            kind = _output_kind(clean) if kind == "auto" else kind
            outputs = {"clean": clean}
            for name, add in (("sae", splice), ("zero", lambda: [add_hook(module, hook_kind, torch.zeros_like)])):
                handles = add()
                try:
                    outputs[name] = forward_tokens(model, input_ids, mask)
                finally:
                    for handle in handles:
                        handle.remove()
            if kind == "ce":
                for name, out in outputs.items():
                    total, n = _ce_sums(out, input_ids, mask)
                    totals[name] += total
                count += n
            else:
                ref = _pooled(clean, mask)
                del outputs["clean"]  # 0 by definition (1 - cos(a, a) may round to 6e-8)
                for name, out in outputs.items():
                    totals[name] += (1 - F.cosine_similarity(_pooled(out, mask), ref, dim=1)).double().sum().item()
                count += input_ids.shape[0]
    if count == 0:
        raise ValueError("batches held no token to score")
    loss = {name: total / count for name, total in totals.items()}
    gap = loss["zero"] - loss["clean"]
    return {"kind": kind, "loss_clean": loss["clean"], "loss_sae": loss["sae"], "loss_zero": loss["zero"],
            "fraction_recovered": (loss["zero"] - loss["sae"]) / gap if gap != 0 else float("nan"),
            "metric": ("next-token cross-entropy" if kind == "ce"
                       else "1 - cosine of mean-pooled output embedding vs clean")}
