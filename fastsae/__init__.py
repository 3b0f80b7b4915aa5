"""fastsae: sparse autoencoders for mechanistic interpretability, with fused Triton kernels.

A drop-in for the nanochat SAE extension's ``sae`` package: ``import fastsae as sae``.
Names are imported on first use so that ``import fastsae`` stays fast and light.
"""
import importlib

from fastsae._version import __version__

_EXPORTS = {
    "SAEConfig": "config",
    "SparseCode": "models", "BaseSAE": "models", "TopKSAE": "models", "BatchTopKSAE": "models",
    "ReLUSAE": "models", "JumpReLUSAE": "models", "GatedSAE": "models", "create_sae": "models",
    "ActivationCollector": "hooks", "collect_activations_from_dataloader": "hooks",
    "ActivationStore": "store", "PairedStore": "store", "collect_to_stores": "store",
    "SAETrainer": "trainer", "train_sae_from_activations": "trainer", "train_saes": "pipeline",
    "InterpretableModel": "runtime",
    "load_saes": "io", "save_sae": "io", "load_sae": "io",
    "SAEEvaluator": "evaluator", "SAEMetrics": "evaluator",
    "FeatureVisualizer": "feature_viz", "generate_sae_summary": "feature_viz",
    "NeuronpediaUploader": "neuronpedia", "create_neuronpedia_metadata": "neuronpedia",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fastsae.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastsae' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
