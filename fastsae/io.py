"""Saving and loading SAEs: fastsae's own layout (the SAELens layout), sparsify SAEs and the
seed's .pt checkpoints.

On disk an SAE is a directory with ``cfg.json`` (SAELens fields plus fastsae's full config
under ``"fastsae"``) and ``sae_weights.safetensors`` holding ``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec`` and, by architecture, ``threshold`` (JumpReLU,
BatchTopK), ``r_mag`` / ``b_mag`` (Gated) or ``W_skip [d_out, d_in]`` (skip transcoders);
d_out is d_in except for transcoders. Every write is atomic; no pickle is ever loaded without
``weights_only=True``.

The two files of a folder are replaced one after the other, so each save writes one random
save id into both (the weights' safetensors metadata and cfg.json); a reader that finds
different ids caught a save in the middle and reads again. A folder is therefore read whole,
from one save, or not at all. Weight shapes are checked against cfg.json from the
safetensors header before any tensor is read.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from fastsae.config import SAEConfig, check_hook_point
from fastsae.files import atomic_save_tensors, atomic_write_json
from fastsae.models import SAE_CLASSES, BaseSAE, create_sae

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
SAVE_ID_KEY = "fastsae_save_id"
READ_ATTEMPTS, READ_RETRY_S = 100, 0.02  # a reader waits up to 2 s for a concurrent save to finish

# fastsae activation -> SAELens architecture. BatchTopK SAEs infer with one threshold for every
# latent, so they are written as JumpReLU SAEs with that threshold per latent, as SAELens does:
# SAELens then encodes them exactly as fastsae does.
_ARCHITECTURES = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu", "relu": "standard",
                  "jumprelu": "jumprelu", "gated": "gated"}
_BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")
# Transcoders: SAELens 6 has ReLU and JumpReLU transcoders, with and without skip ("transcoder",
# "jumprelu_transcoder", "skip_transcoder", "jumprelu_skip_transcoder"); BatchTopK ones are
# written as JumpReLU as above. TopK and Gated transcoders have no SAELens class: they are
# written in the same layout under fastsae's own names, which SAELens refuses to load.
_TRANSCODER_FAMILIES = {"relu": "", "jumprelu": "jumprelu_", "batchtopk": "jumprelu_",
                        "matryoshka_batchtopk": "jumprelu_", "topk": "topk_", "gated": "gated_"}


def saelens_architecture(config: SAEConfig) -> str:
    """The SAELens architecture name a config is written under."""
    if not config.is_transcoder:
        return _ARCHITECTURES[config.activation]
    skip = "skip_" if config.architecture == "skip_transcoder" else ""
    return f"{_TRANSCODER_FAMILIES[config.activation]}{skip}transcoder"


# ----------------------------------------------------------------------------- fastsae / SAELens layout

def sae_state(sae: BaseSAE) -> dict[str, torch.Tensor]:
    """The SAELens-named weights of an SAE."""
    state = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.config.activation == "jumprelu":
        state["threshold"] = torch.exp(sae.log_threshold)
    if sae.config.activation == "gated":
        state.update(b_gate=sae.b_enc, r_mag=sae.r_mag, b_mag=sae.b_mag)
        del state["b_enc"]
    if sae.config.activation in _BATCH_TOPK:
        state["threshold"] = sae.threshold.expand(sae.d_sae)
    if sae.config.architecture == "skip_transcoder":
        state["W_skip"] = sae.W_skip
    return state


def saelens_config(config: SAEConfig, metadata: dict | None = None) -> dict:
    metadata = dict(metadata or {})
    layer = re.search(r"\.(\d+)\.", f".{config.hook_point}.")
    meta = {"model_name": metadata.get("model_name") or "unknown", "hook_name": config.hook_point,
            "hook_layer": int(layer.group(1)) if layer else 0, "hook_head_index": None,
            "prepend_bos": True, "context_size": metadata.get("context_size")}
    if config.is_transcoder:
        meta["hook_name_out"] = config.output_hook_point
    cfg = {"architecture": saelens_architecture(config), "d_in": config.d_in, "d_sae": config.d_sae,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": not config.is_transcoder,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta, **meta}
    if config.is_transcoder:
        cfg["d_out"] = config.d_out
    if config.activation == "topk":
        cfg.update(k=config.k, activation_fn_str="topk", activation_fn_kwargs={"k": config.k})
    else:
        cfg.update(activation_fn_str="relu", activation_fn_kwargs={})
    cfg["fastsae"] = {"config": config.to_dict(), "metadata": metadata}
    return cfg


def save_sae(sae: BaseSAE, config: SAEConfig | None = None, save_path: str | Path = "sae", **metadata) -> Path:
    """Write ``sae`` as a directory in the SAELens layout; extra keyword args go to its metadata."""
    config = config or sae.config
    path = Path(save_path)
    if path.suffix in (".pt", ".pth", ".safetensors"):
        path = path.with_suffix("")
    state = {k: v.float() for k, v in sae_state(sae).items()}
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not saving {path}: weights {bad} contain NaN or Inf")
    save_id = uuid.uuid4().hex
    cfg = saelens_config(config, metadata)
    cfg["fastsae"]["save_id"] = save_id
    atomic_save_tensors(path / WEIGHTS_FILE, state, metadata={SAVE_ID_KEY: save_id})
    atomic_write_json(path / CONFIG_FILE, cfg)
    return path


def _config_from_saelens(cfg, source: str) -> SAEConfig:
    """The SAEConfig a cfg.json describes, or a one-line ValueError naming ``source`` and the field."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    try:
        if isinstance(cfg.get("fastsae"), dict) and isinstance(cfg["fastsae"].get("config"), dict):
            return SAEConfig.from_dict(cfg["fastsae"]["config"])
        return _config_from_plain_saelens(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


_PLAIN_ARCHITECTURES = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "gated": "gated",
                        "transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu",
                        "jumprelu_skip_transcoder": "jumprelu"}


def _transcoder_fields(cfg: dict, arch: str, hook: str) -> dict:
    """architecture, output_hook_point and d_out of a SAELens transcoder's cfg.json."""
    if "transcoder" not in arch:
        return {}
    out = cfg.get("hook_name_out") or (cfg.get("metadata") or {}).get("hook_name_out")
    if out is None and "hook_mlp_in" in hook:  # the usual pairing, when the file does not say
        out = hook.replace("hook_mlp_in", "hook_mlp_out")
    if out is None:
        raise ValueError(f"a {arch} file needs metadata.hook_name_out, the hook point it predicts")
    return {"architecture": "skip_transcoder" if "skip" in arch else "transcoder",
            "output_hook_point": check_hook_point(out, "hook_name_out"), "d_out": cfg.get("d_out", cfg.get("d_in"))}


def _config_from_plain_saelens(cfg: dict) -> SAEConfig:
    arch = cfg.get("architecture", "standard")
    activation = _PLAIN_ARCHITECTURES.get(arch)
    if activation is None:
        raise ValueError(f"architecture {arch!r} is not supported; expected one of {', '.join(_PLAIN_ARCHITECTURES)}")
    for name in ("d_in", "d_sae"):
        if name not in cfg:
            raise ValueError(f"the field {name!r} is missing")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if activation != "topk":
        k = 1  # unused by ReLU-family SAEs
    elif k is None:
        raise ValueError("a topk SAE needs 'k' (or activation_fn_kwargs.k)")
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or "blocks.0.hook_resid_post"
    return SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], activation=activation, k=k,
                     hook_point=check_hook_point(hook, "hook_name"), dtype="float32",
                     **_transcoder_fields(cfg, arch, hook))


def _as_current(tensors: dict, config: SAEConfig) -> dict[str, tuple]:
    """The shapes of ``tensors`` (tensors, or header entries with a "shape"), with a BatchTopK
    threshold written as one number (by earlier fastsae versions) read as one per latent."""
    shapes = {k: tuple(v["shape"] if isinstance(v, dict) else v.shape) for k, v in tensors.items()}
    if config.activation in _BATCH_TOPK and shapes.get("threshold") == (1,):
        shapes["threshold"] = (config.d_sae,)
    return shapes


def _check_shapes(shapes: dict[str, tuple], expected: dict[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"{source} lacks weights {missing}; found {sorted(shapes)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{source}: weight {name} has shape {tuple(shapes[name])}, expected {shape}")


def _expected_shapes(config: SAEConfig) -> dict[str, tuple]:
    """The SAELens weight shapes of an SAE of this config, without allocating it."""
    d_in, d_sae, d_out = config.d_in, config.d_sae, config.d_out
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if config.architecture == "skip_transcoder":
        shapes["W_skip"] = (d_out, d_in)
    if config.activation == "jumprelu":
        shapes["threshold"] = (d_sae,)
    if config.activation == "gated":
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
        del shapes["b_enc"]
    if config.activation in _BATCH_TOPK:
        shapes["threshold"] = (d_sae,)
    return shapes


def _load_state_into(sae: BaseSAE, state: dict[str, torch.Tensor], source: str) -> None:
    _check_shapes(_as_current(state, sae.config), _expected_shapes(sae.config), source)
    with torch.no_grad():
        sae.enc_weight.copy_(state["W_enc"].t())
        sae.W_dec.copy_(state["W_dec"])
        sae.b_dec.copy_(state["b_dec"])
        sae.b_enc.copy_(state["b_gate"] if "b_gate" in state and "b_enc" not in state else state["b_enc"])
        if sae.config.activation == "jumprelu":
            sae.log_threshold.copy_(state["threshold"].clamp_min(1e-12).log())
        if sae.config.activation == "gated":
            sae.r_mag.copy_(state["r_mag"])
            sae.b_mag.copy_(state["b_mag"])
        if sae.config.architecture == "skip_transcoder":
            sae.W_skip.copy_(state["W_skip"])
        if sae.config.activation in _BATCH_TOPK:
            threshold = state["threshold"].reshape(-1)
            if not bool((threshold == threshold[0]).all()):
                raise ValueError(f"{source}: a BatchTopK SAE has one threshold for every latent; these differ "
                                 "(load it as a JumpReLU SAE)")
            sae.threshold.copy_(threshold[0])


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE from a fastsae / SAELens directory, a sparsify directory or a seed .pt file."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return load_seed_checkpoint(path, device)
    if not path.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is neither an SAE directory nor a .pt checkpoint")
    if (path / "sae.safetensors").exists():
        return load_sparsify_sae(path, device)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE} + {WEIGHTS_FILE} (fastsae / SAELens layout) "
                                "nor sae.safetensors (sparsify layout)")
    for _ in range(READ_ATTEMPTS):
        loaded = _read_one_save(path)
        if loaded is not None:
            cfg, config, state = loaded
            sae = create_sae(config)
            _load_state_into(sae, state, str(path / WEIGHTS_FILE))
            fastsae_part = cfg.get("fastsae") if isinstance(cfg.get("fastsae"), dict) else {}
            sae.metadata = fastsae_part.get("metadata", {})
            return sae.to(device).eval()
        time.sleep(READ_RETRY_S)
    raise ValueError(f"{path}: {CONFIG_FILE} and {WEIGHTS_FILE} stayed from different saves for "
                     f"{READ_ATTEMPTS * READ_RETRY_S:.0f} s (is another process writing this folder?)")


def _read_one_save(path: Path):
    """(cfg dict, SAEConfig, weights) of one save, or None when the two files are from different
    saves (a writer is between its two renames). Header and tensors are read through one open
    file, so a rename after the check cannot mix two saves."""
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    config = _config_from_saelens(cfg, str(cfg_path))
    expected_id = cfg["fastsae"].get("save_id") if isinstance(cfg.get("fastsae"), dict) else None
    with open(weights_path, "rb") as f:
        header = _safetensors_header(f, weights_path)
        if expected_id is not None and (header.get("__metadata__") or {}).get(SAVE_ID_KEY) != expected_id:
            return None
        shapes = {k: {"shape": v["shape"]} for k, v in header.items() if k != "__metadata__"}
        _check_shapes(_as_current(shapes, config), _expected_shapes(config), str(weights_path))
        f.seek(0)
        try:
            return cfg, config, safetensors_load(f.read())
        except Exception as e:  # safetensors raises its own error types for truncated/foreign files
            raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None


def _safetensors_header(f, path: Path) -> dict:
    """The JSON header of an open safetensors file (8-byte little-endian length, then JSON)."""
    size = os.fstat(f.fileno()).st_size
    length = int.from_bytes(f.read(8), "little")
    if size < 8 or not 2 <= length <= size - 8:
        raise ValueError(f"{path} is not a readable safetensors file: bad header length")
    try:
        header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a readable safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def load_sparsify_sae(path: str | Path, device="cpu") -> BaseSAE:
    """Load an EleutherAI sparsify SAE (cfg.json + sae.safetensors); it is a TopK SAE with
    ``encoder.weight [num_latents, d_in]`` and the same encode rule as fastsae's."""
    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    state = _read_safetensors(path / "sae.safetensors")
    d_sae, d_in = state["encoder.weight"].shape
    config = SAEConfig(d_in=int(cfg.get("d_in", d_in)), d_sae=int(d_sae), activation="topk", k=int(cfg["k"]),
                       dtype="float32")
    sae = create_sae(config)
    mapped = {"W_enc": state["encoder.weight"].t(), "b_enc": state["encoder.bias"], "W_dec": state["W_dec"],
              "b_dec": state["b_dec"]}
    _load_state_into(sae, {k: v.float() for k, v in mapped.items()}, str(path))
    sae.metadata = {"source": "sparsify"}
    return sae.to(device).eval()


def load_seed_checkpoint(path: str | Path, device="cpu") -> BaseSAE:
    """Load a .pt checkpoint of the nanochat SAE extension, safely (weights_only=True)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be loaded as a weights-only checkpoint "
                         f"(fastsae never unpickles arbitrary objects): {e}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, expected a dict with a state dict and config")
    state = next((ckpt[k] for k in ("model_state_dict", "state_dict", "sae_state_dict") if k in ckpt), None)
    config = ckpt.get("config")
    if state is None or not isinstance(config, dict):
        raise ValueError(f"{path} is not an SAE checkpoint: expected keys 'model_state_dict' and 'config', "
                         f"found {sorted(ckpt)}")
    config = SAEConfig.from_dict(config)
    if config.activation not in SAE_CLASSES:
        raise ValueError(f"{path}: unknown activation {config.activation!r}")
    sae = create_sae(config)
    state = dict(state)
    if "W_gate" in state:
        state.setdefault("W_enc", state["W_gate"])
    _load_state_into(sae, {k: v.float() for k, v in state.items()}, str(path))
    sae.metadata = {k: v for k, v in ckpt.items() if k not in ("model_state_dict", "state_dict", "config")
                    and isinstance(v, (int, float, str))}
    return sae.to(device).eval()


# ----------------------------------------------------------------------------- many SAEs

def _rank(path: Path) -> tuple:
    """Which saved model of a layer wins: best_model, then final, then the latest checkpoint."""
    name = path.stem if path.is_file() else path.name
    if name.startswith("best_model"):
        return (3, 0)
    if name in ("final", "final_model", "sae"):
        return (2, 0)
    step = re.search(r"(\d+)", name)
    return (1, int(step.group(1)) if step else 0)


def _candidates(layer_dir: Path) -> list[Path]:
    found = []
    for p in [layer_dir, *layer_dir.iterdir(), *(layer_dir / "checkpoints").glob("*")]:
        if p.is_dir() and ((p / WEIGHTS_FILE).exists() or (p / "sae.safetensors").exists()):
            found.append(p)
        elif p.is_file() and p.suffix in (".pt", ".pth"):
            found.append(p)
    return found


def load_saes(sae_dir: str | Path, device="cpu", hook_points: list[str] | None = None) -> dict[str, BaseSAE]:
    """Load one SAE per hook point from ``sae_dir`` (``layer_{L}/`` subdirectories or SAE
    directories). For each, the best model wins over final and periodic checkpoints."""
    sae_dir = Path(sae_dir)
    if not sae_dir.is_dir():
        raise FileNotFoundError(f"sae_dir {str(sae_dir)!r} is not a directory")
    groups = [p for p in sorted(sae_dir.iterdir()) if p.is_dir()]
    if _candidates(sae_dir) and not any(_candidates(g) for g in groups):
        groups = [sae_dir]
    saes = {}
    for group in groups:
        found = _candidates(group)
        if not found:
            continue
        try:
            sae = load_sae(max(found, key=_rank), device)
        except (ValueError, FileNotFoundError) as e:  # one broken folder must not hide the others
            warnings.warn(f"skipped {max(found, key=_rank)}: {e}", stacklevel=2)
            continue
        hook = sae.config.hook_point
        if hook_points is None or hook in hook_points:
            saes[hook] = sae
    if hook_points is not None:
        missing = sorted(set(hook_points) - set(saes))
        if missing:
            raise ValueError(f"no SAE found in {sae_dir} for hook points {missing}; found {sorted(saes)}")
    return saes
