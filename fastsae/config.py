"""SAEConfig: the seed-compatible configuration dataclass, with fastsae's additions."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

ACTIVATIONS = ("topk", "batchtopk", "matryoshka_batchtopk", "relu", "jumprelu", "gated")
# Activations that keep k latents per token (exactly, or on average over a batch).
K_ACTIVATIONS = ("topk", "batchtopk", "matryoshka_batchtopk")
# Default Matryoshka prefixes, as fractions of d_sae.
MATRYOSHKA_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
DTYPES = ("float32", "bfloat16", "float16")
# "sae" reconstructs its input; a "transcoder" reads hook_point and predicts output_hook_point
# (e.g. a block's MLP input -> its MLP output); a "skip_transcoder" adds a learned linear map
# x W_skip^T (zero at the start) to that prediction.
ARCHITECTURES = ("sae", "transcoder", "skip_transcoder")
OPTIMIZERS = ("schedule_free_adam", "adam")

# Dotted module names ("blocks.3.hook_resid_post", "model.layers.3.mlp"): the name also names
# output folders, so "..", "/" and empty parts are refused.
HOOK_POINT_PATTERN = re.compile(r"[\w-]+(\.[\w-]+)*")

# field -> smallest allowed value (integers, checked for type too: "16" and 2.5 are refused)
_INT_MINIMUM = {"d_in": 1, "d_sae": 1, "k": 1, "expansion_factor": 1, "num_activations": 1, "batch_size": 1,
                "num_epochs": 1, "warmup_steps": 0, "resample_interval": 0, "eval_every": 1, "save_every": 1,
                "aux_k": 0, "dead_tokens_threshold": 1, "l1_warmup_steps": 0, "seed": 0}
# field -> (smallest allowed value, whether that value itself is allowed); every float must be finite
_FLOAT_MINIMUM = {"l1_coefficient": (0.0, True), "learning_rate": (0.0, False), "dead_latent_threshold": (0.0, True),
                  "aux_k_coefficient": (0.0, True), "l0_coefficient": (0.0, True), "jumprelu_bandwidth": (0.0, False),
                  "jumprelu_init_threshold": (0.0, False), "grad_clip": (0.0, True)}
_BOOLS = ("normalize_decoder", "lr_decay", "normalize_activations")
# JumpReLU's default sparsity weights: on the plain L0 (the weight of the JumpReLU paper's
# penalty) and on a target's squared relative miss, where it has to outweigh the reconstruction's
# pull on the thresholds (at 1e-3 a target of 32 ended at L0 132 after 172 steps on MiniLM
# block 3, d_sae 3072; README, "Quality").
L0_COEFFICIENT = 1e-3
TARGET_L0_COEFFICIENT = 1.0


def check_hook_point(name, source: str = "hook_point") -> str:
    """``name`` if it is a dotted module name, else a ValueError naming ``source``."""
    if not isinstance(name, str) or not HOOK_POINT_PATTERN.fullmatch(name):
        raise ValueError(f"{source} must be a dotted module name such as 'blocks.3.hook_resid_post', got {name!r}")
    return name


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def _check_float(name: str, value, minimum: float, inclusive: bool) -> None:
    relation = ">=" if inclusive else ">"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value}")


def _matryoshka_sizes(sizes, d_sae: int) -> tuple[int, ...]:
    """The checked prefix widths (see SAEConfig.matryoshka_sizes)."""
    if sizes is None:
        sizes = sorted({max(1, round(f * d_sae)) for f in MATRYOSHKA_FRACTIONS})
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (list, tuple)) or not sizes:
        raise ValueError(f"matryoshka_sizes must be a non-empty list of prefix widths, got {sizes!r}")
    for size in sizes:
        _check_int("matryoshka_sizes entries", size, 1)
    sizes = list(sizes) if sizes[-1] == d_sae else [*sizes, d_sae]
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != d_sae:
        raise ValueError(f"matryoshka_sizes must increase strictly up to d_sae={d_sae}, got {sizes}")
    return tuple(sizes)


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int | None = None
    activation: str = "topk"
    k: int = 64
    l1_coefficient: float = 1e-3
    # Decoder rows kept at unit norm (the gradient along them removed). None: True for an SAE,
    # False for a transcoder (as sparsify trains them: on MiniLM's MLP it halved the dead latents).
    normalize_decoder: bool | None = None
    # Compute dtype of training on CUDA (autocast; "float32" turns it off). Parameters and
    # optimizer state stay float32; CPU training runs in float32.
    dtype: str = "bfloat16"
    hook_point: str = "blocks.0.hook_resid_post"
    expansion_factor: int = 8
    num_activations: int = 10_000_000
    batch_size: int = 4096
    num_epochs: int = 10
    # None: derived from the width and the batch (trainer.auto_learning_rate); a number is used as is.
    learning_rate: float | None = None
    # "schedule_free_adam" (Defazio et al. 2024: no decay schedule, the saved SAE is the iterates'
    # average) or "adam" (Adam with warmup and, with lr_decay, linear decay).
    optimizer: str = "schedule_free_adam"
    warmup_steps: int = 1000
    dead_latent_threshold: float = 0.001
    resample_interval: int = 25000
    eval_every: int = 1000
    save_every: int = 10000
    # fastsae additions
    aux_k: int | None = None  # AuxK latents; default d_in // 2
    # AuxK weight: 1/8 (Gao et al. use 1/32) revives dead latents within a short run's few steps.
    aux_k_coefficient: float = 1 / 8
    dead_tokens_threshold: int = 10_000_000  # a latent silent this many tokens is dead
    # JumpReLU: the mean L0 the sparsity term steers to, (L0 / target_l0 - 1)^2, with b_enc
    # balanced and thresholds at each latent's (1 - target_l0 / d_sae) pre-activation quantile at
    # the start, learning THRESHOLD_LR_FACTOR times faster than the weights (trainer). None: the
    # plain L0 penalty.
    target_l0: float | None = None
    # JumpReLU sparsity weight. None: L0_COEFFICIENT on the plain L0, TARGET_L0_COEFFICIENT on the
    # target's squared relative miss.
    l0_coefficient: float | None = None
    # Width of the straight-through window around each threshold, in the units of the
    # normalised inputs (E||x||^2 = d_in puts pre-activations at about unit scale). With a
    # target of 32 on MiniLM block 3 (d_sae 3072, 172 steps): held-out FVU 0.104 and 0.8% of
    # latents dead at 0.05, 0.110 and 2.5% at 1e-3.
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 1e-3
    l1_warmup_steps: int = 0
    lr_decay: bool = True  # optimizer "adam": linear decay to 0 over the last 20% of steps
    grad_clip: float = 1.0
    normalize_activations: bool = True  # scale inputs to E||x||^2 = d_in during training
    seed: int = 0
    # matryoshka_batchtopk: the nested dictionary prefixes' widths, strictly increasing, the last
    # d_sae (appended when missing); None: MATRYOSHKA_FRACTIONS of d_sae. Each prefix's
    # reconstruction adds its MSE to the loss, so early latents learn to stand alone.
    matryoshka_sizes: tuple[int, ...] | None = None
    # See ARCHITECTURES. A transcoder's output_hook_point names its target, d_out its width
    # (None: d_in); an SAE has neither.
    architecture: str = "sae"
    output_hook_point: str | None = None
    d_out: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every field checked for type and range, so a bad value fails here, not hours later."""
        _check_int("d_in", self.d_in, 1)
        _check_int("expansion_factor", self.expansion_factor, 1)
        if self.d_sae is None:
            self.d_sae = self.d_in * self.expansion_factor
        for name, minimum in _INT_MINIMUM.items():
            if not (name == "aux_k" and self.aux_k is None):  # None: the default, set below
                _check_int(name, getattr(self, name), minimum)
        self._check_target_l0()
        for name, (minimum, inclusive) in _FLOAT_MINIMUM.items():
            if not (name == "learning_rate" and self.learning_rate is None):  # None: automatic
                _check_float(name, getattr(self, name), minimum, inclusive)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.normalize_decoder is None:
            self.normalize_decoder = self.architecture == "sae"
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_hook_point(self.hook_point)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in K_ACTIVATIONS and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.activation == "matryoshka_batchtopk":
            self.matryoshka_sizes = _matryoshka_sizes(self.matryoshka_sizes, self.d_sae)
        elif self.matryoshka_sizes is not None:
            raise ValueError(f"matryoshka_sizes is for activation 'matryoshka_batchtopk', not {self.activation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.aux_k is None:
            self.aux_k = min(max(self.d_in // 2, 1), self.d_sae)
        self._check_architecture()

    def _check_target_l0(self) -> None:
        """target_l0 checked (a JumpReLU's, in (0, d_sae]); l0_coefficient's default resolved."""
        if self.target_l0 is not None:
            if self.activation != "jumprelu":
                raise ValueError(f"target_l0 is for activation 'jumprelu', not {self.activation!r} (the TopK "
                                 "kinds set their L0 with k)")
            if (isinstance(self.target_l0, bool) or not isinstance(self.target_l0, (int, float))
                    or not 0 < self.target_l0 <= self.d_sae):
                raise ValueError(f"target_l0 must be a number in (0, d_sae={self.d_sae}], got {self.target_l0!r}")
        if self.l0_coefficient is None:
            self.l0_coefficient = L0_COEFFICIENT if self.target_l0 is None else TARGET_L0_COEFFICIENT

    def _check_architecture(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if not self.is_transcoder:
            if self.output_hook_point is not None:
                raise ValueError(f"output_hook_point is for transcoders; architecture {self.architecture!r} "
                                 "reconstructs its own hook point (set architecture='transcoder')")
            if self.d_out not in (None, self.d_in):
                raise ValueError(f"d_out must equal d_in={self.d_in} for architecture 'sae', got {self.d_out}")
            self.d_out = self.d_in
            return
        if self.output_hook_point is None:
            raise ValueError(f"architecture {self.architecture!r} needs output_hook_point, the hook point it "
                             "predicts (e.g. 'blocks.3.hook_mlp_out')")
        check_hook_point(self.output_hook_point, "output_hook_point")
        if self.output_hook_point == self.hook_point:
            raise ValueError(f"output_hook_point must differ from hook_point ({self.hook_point!r}); "
                             "an SAE (architecture='sae') reconstructs its own hook point")
        if self.d_out is None:
            self.d_out = self.d_in
        _check_int("d_out", self.d_out, 1)

    @property
    def is_transcoder(self) -> bool:
        return self.architecture != "sae"

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
        if not isinstance(d, dict):
            raise ValueError(f"an SAE config must be a JSON object, got {type(d).__name__}")
        if "d_in" not in d:
            raise ValueError("the field 'd_in' is missing")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
