"""SAEConfig: the seed-compatible configuration dataclass, with fastsae's additions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "gated")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int | None = None
    activation: str = "topk"
    k: int = 64
    l1_coefficient: float = 1e-3
    normalize_decoder: bool = True
    # Compute dtype of training on CUDA (autocast; "float32" turns it off). Parameters and
    # optimizer state stay float32; CPU training runs in float32.
    dtype: str = "bfloat16"
    hook_point: str = "blocks.0.hook_resid_post"
    expansion_factor: int = 8
    num_activations: int = 10_000_000
    batch_size: int = 4096
    num_epochs: int = 10
    learning_rate: float = 3e-4
    warmup_steps: int = 1000
    dead_latent_threshold: float = 0.001
    resample_interval: int = 25000
    eval_every: int = 1000
    save_every: int = 10000
    # fastsae additions
    aux_k: int | None = None  # AuxK latents; default d_in // 2
    aux_k_coefficient: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000  # a latent silent this many tokens is dead
    l0_coefficient: float = 1e-3  # JumpReLU sparsity penalty
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    l1_warmup_steps: int = 0
    lr_decay: bool = True  # linear decay to 0 over the last 20% of steps
    grad_clip: float = 1.0
    normalize_activations: bool = True  # scale inputs to E||x||^2 = d_in during training
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.d_in, int) or self.d_in < 1:
            raise ValueError(f"d_in must be a positive int, got {self.d_in!r}")
        if self.d_sae is None:
            self.d_sae = self.d_in * self.expansion_factor
        if not isinstance(self.d_sae, int) or self.d_sae < 1:
            raise ValueError(f"d_sae must be a positive int, got {self.d_sae!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.aux_k is None:
            self.aux_k = min(max(self.d_in // 2, 1), self.d_sae)

    @classmethod
    def from_model(cls, model, layer_idx: int, hook_type: str = "resid_post", **kwargs) -> "SAEConfig":
        """A config for a nanochat-style model: d_in from model.config.n_embd."""
        cfg = getattr(model, "config", None)
        d_in = getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", None)
        if d_in is None:
            raise ValueError("model.config has neither n_embd nor hidden_size; pass d_in explicitly")
        n_layer = getattr(cfg, "n_layer", None) or getattr(cfg, "num_hidden_layers", None)
        if n_layer is not None and not 0 <= layer_idx < n_layer:
            raise ValueError(f"layer_idx must be in [0, {n_layer}), got {layer_idx}")
        return cls(d_in=int(d_in), hook_point=f"blocks.{layer_idx}.hook_{hook_type}", **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
