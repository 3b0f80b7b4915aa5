"""Export an SAE in the layout Neuronpedia imports.

``prepare_sae_for_upload`` writes into one directory:

- ``cfg.json`` + ``sae_weights.safetensors``: the SAE in the SAELens layout (``fastsae.io.save_sae``);
- ``sparsity.safetensors``: ``{"sparsity": log10(feature density + 1e-10)}``, as SAELens stores it;
- ``batch-0.json``, ``batch-1.json``, ...: feature dashboard data in the shape SAEDashboard's
  Neuronpedia runner writes (what Neuronpedia's converter reads): an object with ``model_id``,
  ``layer``, ``sae_set``, ``sae_id_suffix`` and ``features``, a list with per feature
  ``feature_index``, ``activations`` (token strings + per-token values; top examples have
  ``bin_min = -1``, quantile samples the band bounds), ``frac_nonzero`` (density),
  ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (output tokens the decoder
  direction promotes / suppresses, when the model has an unembedding) and histograms;
- ``metadata.json`` (``create_neuronpedia_metadata``) and a short README.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastsae.config import K_ACTIVATIONS, SAEConfig
from fastsae.feature_viz import TokenText, feature_data, logit_effects, writes_to_residual
from fastsae.files import atomic_save_tensors, atomic_write_json, atomic_write_text
from fastsae.io import save_sae
from fastsae.latent_cache import LatentCache
from fastsae.models import BaseSAE

SPARSITY_EPS = 1e-10


def create_neuronpedia_metadata(sae: BaseSAE, config: SAEConfig | None = None, training_info: dict | None = None,
                                eval_metrics=None) -> dict:
    """Architecture, sparsity settings, and optional training details and evaluation metrics."""
    config = config or sae.config
    if hasattr(eval_metrics, "to_dict"):
        eval_metrics = eval_metrics.to_dict()
    metadata = {
        "architecture": {"type": config.activation, "d_in": config.d_in, "d_sae": config.d_sae,
                         "expansion_factor": config.d_sae / config.d_in, "normalize_decoder": config.normalize_decoder},
        "sparsity_config": {"k": config.k if config.activation in K_ACTIVATIONS else None,
                            "l1_coefficient": config.l1_coefficient if config.activation in ("relu", "gated") else None,
                            "l0_coefficient": config.l0_coefficient if config.activation == "jumprelu" else None},
        "hook_point": config.hook_point,
    }
    if config.is_transcoder:
        metadata["architecture"].update(transcoder=config.architecture, d_out=config.d_out)
        metadata["hook_point_out"] = config.output_hook_point
    if training_info:
        metadata["training"] = training_info
    if eval_metrics:
        metadata["evaluation"] = eval_metrics
    return metadata


def _histogram(values: torch.Tensor, bins: int = 20) -> tuple[list, list]:
    """(bar heights, bar centres) of a 1-d tensor, as SAEDashboard's histograms."""
    if values.numel() == 0:
        return [], []
    lo, hi = values.min().item(), values.max().item()
    if hi <= lo:
        return [int(values.numel())], [lo]
    heights = torch.histc(values.float(), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [int(h) for h in heights.tolist()], [lo + (i + 0.5) * width for i in range(bins)]


def _activation_record(example: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    values = example["values"]
    top = max(range(len(values)), key=values.__getitem__)
    return {"tokens": example["tokens"], "values": values, "bin_min": bin_min, "bin_max": bin_max,
            "bin_contains": bin_contains, "qualifying_token_index": example["focus"],
            "maxValue": values[top], "maxValueTokenIndex": top, "doc_id": example["doc_id"]}


def neuronpedia_feature(cache: LatentCache, feature: int, text: TokenText, sae: BaseSAE,
                        W_U: torch.Tensor | None = None, n_examples: int = 20, n_quantiles: int = 5,
                        per_quantile: int = 5) -> dict:
    """One feature's record in a Neuronpedia batch file."""
    data = feature_data(cache, feature, text, sae, W_U, n_examples=n_examples, n_quantiles=n_quantiles,
                        per_quantile=per_quantile)
    activations = [_activation_record(e, -1, -1, -1) for e in data["examples"]]
    for band in data["quantiles"]:
        activations += [_activation_record(e, band["low"], band["high"], 1 / max(len(data["quantiles"]), 1))
                        for e in band["examples"]]
    freq_heights, freq_values = _histogram(cache.feature(feature)[1])
    logit_heights, logit_values = [], []
    if writes_to_residual(sae, W_U):
        with torch.no_grad():
            logit_heights, logit_values = _histogram(W_U.float() @ sae.W_dec[feature].detach().float())
    return {
        "feature_index": feature, "index": feature, "density": data["density"], "frac_nonzero": data["density"],
        "max_activation": data["max_activation"], "activations": activations,
        "pos_str": [t["token"] for t in data["top_logits"]], "pos_values": [t["value"] for t in data["top_logits"]],
        "neg_str": [t["token"] for t in data["bottom_logits"]],
        "neg_values": [t["value"] for t in data["bottom_logits"]],
        "freq_hist_data_bar_heights": freq_heights, "freq_hist_data_bar_values": freq_values,
        "logits_hist_data_bar_heights": logit_heights, "logits_hist_data_bar_values": logit_values,
        "cooccurring_features": data["cooccurring"],
        "correlated_features_indices": [c["index"] for c in data["cooccurring"]],
        "correlated_features_pearson": [], "correlated_features_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "decoder_weights_dist": [],
    }


class NeuronpediaUploader:
    """Prepares an SAE export directory for Neuronpedia (the seed's class, with a real format)."""

    def __init__(self, model_name: str = "nanochat", model_version: str = "d20"):
        self.model_name = model_name
        self.model_version = model_version

    @property
    def model_id(self) -> str:
        return f"{self.model_name}-{self.model_version}" if self.model_version else self.model_name

    def prepare_sae_for_upload(self, sae: BaseSAE, config: SAEConfig | None, output_dir: str | Path,
                               metadata: dict | None = None, *, cache: LatentCache | None = None,
                               activations: torch.Tensor | None = None, tokenizer=None,
                               W_U: torch.Tensor | None = None, features: list[int] | None = None,
                               features_per_batch: int = 128, sae_set: str | None = None) -> Path:
        """Write the export to ``output_dir`` and return it.

        Feature data (sparsity file and batch files) needs the latents on real text: pass a
        ``cache`` (``LatentCache``) or ``activations`` [N, d_in]; without either only the
        weights, config and metadata are written. ``features`` defaults to every latent.
        """
        config = config or sae.config
        output_dir = Path(output_dir)
        save_sae(sae, config, output_dir, **{"model_name": self.model_id, **(metadata or {})})
        atomic_write_json(output_dir / "metadata.json", {"model_id": self.model_id, **create_neuronpedia_metadata(
            sae, config, training_info=(metadata or {}).get("training"),
            eval_metrics=(metadata or {}).get("evaluation"))})
        if cache is None and activations is not None:
            cache = LatentCache.from_activations(sae, activations)
        written = []
        if cache is not None:
            density = cache.density().float()
            atomic_save_tensors(output_dir / "sparsity.safetensors", {"sparsity": torch.log10(density + SPARSITY_EPS)})
            written = self._write_batches(sae, config, cache, output_dir, tokenizer, W_U,
                                          list(range(sae.d_sae)) if features is None else list(features),
                                          features_per_batch, sae_set)
        atomic_write_text(output_dir / "README.md", self._readme(config, written))
        return output_dir

    def _write_batches(self, sae, config, cache, output_dir, tokenizer, W_U, features, per_batch, sae_set):
        layer = re.search(r"\.(\d+)\.", f".{config.hook_point}.")
        text = TokenText(tokenizer)
        written = []
        for b, start in enumerate(range(0, len(features), per_batch)):
            batch = {"model_id": self.model_id, "layer": int(layer.group(1)) if layer else 0,
                     "sae_set": sae_set or f"fastsae-{config.activation}-{config.d_sae}",
                     "sae_id_suffix": None, "hook_point": config.hook_point,
                     **({"hook_point_out": config.output_hook_point} if config.is_transcoder else {}),
                     "features": [neuronpedia_feature(cache, f, text, sae, W_U)
                                  for f in features[start:start + per_batch]]}
            written.append(atomic_write_json(output_dir / f"batch-{b}.json", batch).name)
        return written

    def _readme(self, config: SAEConfig, batches: list[str]) -> str:
        where = f"hook point: {config.hook_point}"
        if config.is_transcoder:
            where += f" -> {config.output_hook_point} ({config.architecture.replace('_', ' ')}, d_out {config.d_out})"
        return (f"# SAE export for Neuronpedia\n\nModel: {self.model_id}; {where}; "
                f"architecture: {config.activation}; d_in {config.d_in}, d_sae {config.d_sae}.\n\n"
                "- `cfg.json`, `sae_weights.safetensors`: the SAE in the SAELens layout "
                "(host these, e.g. in a Hugging Face repository, for Neuronpedia to load).\n"
                "- `sparsity.safetensors`: log10 feature density (key `sparsity`).\n"
                f"- {len(batches)} feature batch files (`batch-N.json`) in SAEDashboard's Neuronpedia format: "
                "convert them with Neuronpedia's `convert-saedashboard-to-neuronpedia-export.py "
                "--saedashboard-output-dir=<this directory>` and submit through Neuronpedia's upload form.\n"
                "- `metadata.json`: architecture, training and evaluation details.\n")


__all__ = ["NeuronpediaUploader", "create_neuronpedia_metadata", "logit_effects", "neuronpedia_feature"]
