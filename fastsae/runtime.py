"""Feature tracking and steering while a model runs: ``InterpretableModel``.

Tracking and steering are separate forward hooks with separate handles, so either context
can be entered or left without touching the other. At a hook point with both, steering runs
first and tracking records the features of the activation the rest of the model sees.

Steering edits features without dropping the SAE's error: the activation becomes
``x + decode(f') - decode(f) = x + (f' - f) @ W_dec``, computed only over the edited latents'
decoder rows. A transcoder (keyed by its input hook point) is tracked at its input and
steered at its output hook point: the features come from the input as it passes, and
``(f' - f) @ W_dec`` is added to the output activation (e.g. the MLP's). A feature's edit is
``f' = a * f + b``: add (a=1, b=s), clamp (a=0, b=v), scale (a=s, b=0), ablate (a=0, b=0).
Edits that cannot change anything (scale 1, add 0) are dropped, so they leave the model's output bit-identical.

On a GPU, hooks never read a tensor back to the host (no .item(), .cpu() or Python branching
on tensor values) and run with fastsae's NaN scan off, so a decode step is not synchronised;
what they record is merged and printed later (see ``fastsae.trace``). The variable-L0
encoders (ReLU, JumpReLU, Gated, BatchTopK at inference) size their output from the data and
so do read a count back; TopK does not. On CPU, where a read costs no synchronisation, the
exact TopK encodes from a bf16 or fp16 product read a few numbers per call (cuts, counts).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fastsae import ops, selection, torch_backend
from fastsae.hooks import add_hook, resolve_hook_point
from fastsae.models import SparseCode, TopKSAE
from fastsae.trace import ENCODE_ROWS, HookTrace, Trace

__all__ = ["FeatureEdit", "InterpretableModel", "ablate", "add", "clamp", "scale"]

EDIT_MODES = ("add", "clamp", "scale", "ablate")


@dataclass(frozen=True)
class FeatureEdit:
    """An edit of one latent: mode in EDIT_MODES, value the strength / clamp value / factor."""

    feature: int
    mode: str = "scale"
    value: float = 1.0

    def __post_init__(self):
        if self.mode not in EDIT_MODES:
            raise ValueError(f"edit mode must be one of {EDIT_MODES}, got {self.mode!r}")
        if isinstance(self.feature, bool) or not isinstance(self.feature, int):
            raise TypeError(f"feature index must be an int, got {type(self.feature).__name__}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise TypeError(f"edit value must be a number, got {type(self.value).__name__}")

    @property
    def is_noop(self) -> bool:
        return (self.mode == "scale" and self.value == 1.0) or (self.mode == "add" and self.value == 0.0)

    def coefficients(self) -> tuple[float, float]:
        """(a, b) with f' = a * f + b."""
        return {"add": (1.0, self.value), "clamp": (0.0, self.value), "scale": (self.value, 0.0),
                "ablate": (0.0, 0.0)}[self.mode]


def add(feature: int, strength: float) -> FeatureEdit:
    """Add ``strength`` to the feature (its decoder row times strength, on every token)."""
    return FeatureEdit(feature, "add", strength)


def clamp(feature: int, value: float) -> FeatureEdit:
    """Set the feature to ``value`` on every token."""
    return FeatureEdit(feature, "clamp", value)


def scale(feature: int, factor: float) -> FeatureEdit:
    """Multiply the feature by ``factor`` (the seed's ``(feature_idx, strength)`` meaning)."""
    return FeatureEdit(feature, "scale", factor)


def ablate(feature: int) -> FeatureEdit:
    """Remove the feature: x - f * W_dec[feature]."""
    return FeatureEdit(feature, "ablate", 0.0)


# ----------------------------------------------------------------------------- hook plumbing

def _input_ids(args, kwargs) -> torch.Tensor | None:
    """The token ids of a top-level forward call, if it has them."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("idx")):
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value
    return None


def _token_entry(model: nn.Module) -> nn.Module:
    """The module that first receives the token ids: the input embedding (Hugging Face's
    get_input_embeddings, nanochat's transformer.wte), else the model itself."""
    try:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # a Hugging Face model that does not say where its embedding is
        embedding = None
    if embedding is None:
        transformer = getattr(model, "transformer", None)
        embedding = getattr(transformer, "wte", None) if transformer is not None else None
    return embedding if isinstance(embedding, nn.Module) else model


# A decode step's activation has a row or two, and its GEMM is a matrix-vector product bound by
# reading all of W_enc. torch's addmm streams the encoder stored input-major ([d_in, d_sae],
# contiguous) about twice as fast as oneDNN's linear reads the [d_sae, d_in] layout (fp32, one
# thread, W_enc evicted by the model between steps, on an AMD EPYC: 0.30 vs 0.71 ms per step at
# d_in 256, d_sae 4096); from about 4 rows on oneDNN is as fast or faster. Up to this many rows the
# hooks use a transposed copy.
GEMV_ROWS = 2


def _transposed(W: torch.Tensor) -> torch.Tensor:
    """W_enc as [d_in, d_sae], contiguous (the layout the decode step's addmm streams fastest)."""
    return W.detach().t().contiguous()


class _TrackingEncoder:
    """A TopK SAE's code for the hooks on the torch backend. A row or two (a steering decode step;
    tracking holds its rows and encodes them in batches, ``encode_rows``): where
    the fp32 encoder is too big to stay cached between steps (``fp16_rows_pay``), the backend's
    exact one-row encode from a float16 copy kept here (half the bytes read per step); else an
    addmm on a transposed copy of W_enc, then torch.topk. Larger calls (prefill, tracking's
    batches): where the CPU has a bf16 unit and the dictionary has the 2k groups of latents the
    cut needs (``selection.usable``), the backend's exact bf16 encode on a bf16 copy of the
    encoder kept here (half the fp32 encoder's bytes more memory; one thread, N 64, k 32,
    alternated with the fp32 path: d_in 1280, d_sae 20480, 25.8 vs 45.6 ms; d_in 256, d_sae 4096,
    3.1 vs 2.9 ms, 2-core AMD EPYC); else
    oneDNN's fp32 GEMM + ReLU, then torch.topk. Values equal
    ``encode_sparse``'s up to the rounding of the dot products' summation order; only the order
    among exactly equal values may differ on the torch.topk paths. (The backend's stable tie
    rule looks for ties on the host, a read-back inside every hook that costs the per-token
    decode budget about two points.)"""

    def __init__(self, sae):
        self.sae = sae
        self._copies: dict[str, tuple] = {}  # name -> (what its tensors were when made, the copy)

    def _copy(self, name: str, make, *tensors):
        """make(*tensors), kept and made again whenever one of the tensors changes (its storage
        or its version counter: the SAE trained on in place). An edit through ``.data`` leaves
        the counter as it was: ``InterpretableModel.refresh_copies`` drops the copies then."""
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        kept = self._copies.get(name)
        if kept is None or kept[0] != key:
            kept = self._copies[name] = (key, make(*tensors))
        return kept[1]

    def __call__(self, x: torch.Tensor) -> SparseCode:
        sae = self.sae
        bias, k = sae.input_bias, sae.config.k
        if x.shape[0] <= GEMV_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
            if torch_backend.fp16_rows_pay(sae.enc_weight):
                half = self._copy("fp16", torch_backend.HalfPrecisionEncoder, sae.enc_weight, sae.b_enc)
                values, indices = torch_backend.topk_rows_fp16(x, sae.enc_weight, sae.b_enc, bias, k, half)
                return SparseCode(values, indices, sae.d_sae)
            W_t = self._copy("transposed", _transposed, sae.enc_weight)
            pre = torch.addmm(sae.b_enc, x if bias is None else x - bias, W_t).relu_()
        elif (torch_backend.uses_bf16_gemm(x, sae.enc_weight, weights_cached=True)
              and selection.usable(sae.d_sae, k)):
            bf16 = self._copy("bf16", torch_backend.LowPrecisionWeights, sae.enc_weight, sae.b_enc)
            values, indices, _, _ = torch_backend.topk_encode(x, sae.enc_weight, sae.b_enc, bias, k, low_precision=bf16)
            return SparseCode(values, indices, sae.d_sae)
        else:
            pre = torch_backend.encoder_preactivations(x, sae.enc_weight, sae.b_enc, bias, relu=True)
        values, indices = pre.topk(k, dim=1)
        return SparseCode(values, indices, sae.d_sae)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _is_hf_generator(model: nn.Module) -> bool:
    # nanochat's GPT also has a .generate (a token-by-token Python generator with another
    # signature); Hugging Face models are told apart by their generation_config.
    return hasattr(model, "generation_config") and callable(getattr(model, "generate", None))


class _Plan:
    """The edits at one hook point as tensors: latent ids, f' = a * f + b coefficients, and their
    decoder rows (gathered once, so a step touches only these rows)."""

    def __init__(self, sae, edits: list[FeatureEdit]):
        device = sae.W_dec.device
        self.features = torch.tensor([e.feature for e in edits], dtype=torch.long, device=device)
        coef = torch.tensor([e.coefficients() for e in edits], dtype=sae.dtype, device=device)
        self.a, self.b = coef[:, 0], coef[:, 1]
        self.rows = sae.W_dec.detach()[self.features]  # [E, d_out]
        # Pure additions do not depend on the activation: one constant vector, no encode.
        self.constant = self.b @ self.rows if all(e.mode == "add" for e in edits) else None


# ----------------------------------------------------------------------------- the model

class InterpretableModel(nn.Module):
    """A model with SAEs at hook points: track features and steer them while it runs.

    ``saes`` maps hook point names (``blocks.{i}.hook_resid_post`` etc., or module paths; see
    ``fastsae.hooks``) to SAEs. The SAEs are moved to ``device`` (default: the model's) and put
    in eval mode. Activations are cast to each SAE's dtype at the hook and edits cast back.

    ``track_k``: latents recorded per token (default: the SAE's k for TopK SAEs, else 64);
    ``max_examples``: max-activating examples kept per feature; ``keep_trace=False`` keeps
    only those examples, not every token's features; ``encode_rows``: tracked activation rows
    (tokens x batch) held at a hook point before they are encoded together (1: encode inside
    every forward). Held rows are also encoded when the trace is read and when
    ``interpretation_enabled()`` exits; an SAE whose weights change inside that block encodes
    the rows still held with its new weights (``self.trace.flush()`` first avoids that).
    """

    def __init__(self, model: nn.Module, saes: dict, device=None, track_k: int | None = None,
                 max_examples: int = 10, keep_trace: bool = True, encode_rows: int = ENCODE_ROWS):
        super().__init__()
        if not saes:
            raise ValueError("saes is empty: give at least one {hook_point: SAE}")
        if isinstance(encode_rows, bool) or not isinstance(encode_rows, int) or encode_rows < 1:
            raise ValueError(f"encode_rows must be an integer >= 1, got {encode_rows!r}")
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.saes = {hp: sae.to(self.device).eval() for hp, sae in saes.items()}
        # Hook point names contain dots, which ModuleDict keys may not: the modules are also
        # registered under escaped keys so .to() and state_dict() reach them.
        self._sae_modules = nn.ModuleDict({hp.replace(".", "__"): sae for hp, sae in self.saes.items()})
        self._targets = {hp: resolve_hook_point(model, hp) for hp in self.saes}  # unknown names fail here
        # A transcoder (keyed by its input hook point) is steered where it writes: its output hook point.
        self._output_targets = {hp: resolve_hook_point(model, sae.config.output_hook_point)
                                for hp, sae in self.saes.items() if sae.config.is_transcoder}
        # Decided once: a per-step backend lookup reads the environment on every call.
        self._topk_encoders = {hp: _TrackingEncoder(sae) for hp, sae in self.saes.items()
                               if type(sae) is TopKSAE and ops.resolve_backend(None, self.device) == "torch"}
        self.track_k = track_k
        self.max_examples = max_examples
        self.keep_trace = keep_trace
        self.encode_rows = encode_rows
        self.trace: Trace | None = None
        self._tracking = False

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        """The wrapped model's attributes (config, get_device, ...), so code written for the model
        (nanochat's Engine, a Hugging Face pipeline) accepts the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    # -- input at a hook ------------------------------------------------------------------------
    def _sae_input(self, hook_point: str, x: torch.Tensor) -> torch.Tensor:
        """The activation as [N, d_in] in the SAE's dtype, after checks that read no tensor values."""
        sae = self.saes[hook_point]
        if not x.is_floating_point():
            raise TypeError(f"activation at {hook_point!r} has dtype {x.dtype}; an SAE needs a floating-point "
                            "activation (is this hook point reading token ids?)")
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"activation at {hook_point!r} has shape {tuple(x.shape)}: last dimension "
                             f"{x.shape[-1]} != the SAE's d_in={sae.d_in}")
        if x.device != sae.device:
            raise ValueError(f"activation at {hook_point!r} is on {x.device} but its SAE is on {sae.device}; "
                             "pass device= to InterpretableModel")
        return x.detach().reshape(-1, sae.d_in).to(sae.dtype)

    def _encode(self, hook_point: str, flat: torch.Tensor):
        sae = self.saes[hook_point]
        with torch.no_grad():
            if hook_point in self._topk_encoders:
                return self._topk_encoders[hook_point](flat)
            with ops.input_checks(False):  # the NaN scan would read back to the host
                return sae.encode_sparse(flat)

    # -- tracking -------------------------------------------------------------------------------
    def _track_width(self, sae) -> int:
        if self.track_k is not None:
            return min(self.track_k, sae.d_sae)
        return sae.config.k if sae.config.activation == "topk" else min(64, sae.d_sae)

    def _top_features(self, hook_point: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, m] values and latent ids, strongest first."""
        sae = self.saes[hook_point]
        m = self._track_width(sae)
        code = self._encode(hook_point, flat)
        if code.row_offsets is None and code.values.shape[1] >= m:
            return code.values[:, :m], code.indices[:, :m]  # fixed-k codes come sorted
        values, order = code.to_dense().topk(m, dim=1)
        return values, order

    def _track(self, hook_point: str, x: torch.Tensor) -> None:
        rows = self._sae_input(hook_point, x)
        lead = x.shape[:-1]
        tokens = lead[-1] if len(lead) else 1
        self.trace.hooks[hook_point].record(rows, rows.shape[0] // max(tokens, 1), tokens, self.trace.step)

    def reset_tracking(self) -> Trace:
        """Start a fresh trace (entering interpretation_enabled() does this)."""
        self.trace = Trace()
        for hp, sae in self.saes.items():
            self.trace.hooks[hp] = HookTrace(hp, sae.d_sae, sae.device, partial(self._top_features, hp),
                                             self.max_examples, self.keep_trace, self.encode_rows)
        return self.trace

    def refresh_copies(self) -> None:
        """Drop the encoder copies the hooks keep (float16, bfloat16, transposed), so the next
        call makes them from the SAEs' current weights. Needed only after an edit that PyTorch's
        version counter does not see, one through ``.data`` (``sae.W_enc.data[i] = 0``): an
        in-place edit under ``torch.no_grad()``, or a new tensor, is seen without it."""
        for encoder in self._topk_encoders.values():
            encoder._copies.clear()

    @contextlib.contextmanager
    def interpretation_enabled(self):
        """Record the top features of every token at every hook point until the block exits.

        The trace (``self.trace``) stays readable after exit, until the next entry; the rows still
        held (``encode_rows``) are encoded on a normal exit.
        """
        if self._tracking:
            raise RuntimeError("interpretation_enabled() is already active on this model")
        self.reset_tracking()
        handles = []
        try:
            # The token ids are read where they enter the model, the input embedding, so that a
            # caller of model.forward() (nanochat's Engine) is seen like a caller of model().
            handles.append(_token_entry(self.model).register_forward_pre_hook(
                lambda _m, args, kwargs: self.trace.start_step(_input_ids(args, kwargs)), with_kwargs=True))
            for hp, (module, kind) in self._targets.items():
                handles.append(add_hook(module, kind, lambda x, hp=hp: self._track(hp, x)))
            self._tracking = True
            yield self
            self.trace.flush()  # with the weights the block ran with
        finally:
            for handle in handles:
                handle.remove()
            self._tracking = False

    def get_active_features(self, hook_point: str | None = None, top_k: int | None = None) -> dict:
        """{hook_point: dense features [N, d_sae]} of every token tracked so far (prefill and each
        decode step, in order), or with top_k {hook_point: (indices [N, top_k], values [N, top_k])}."""
        if self.trace is None or all(not h._chunks for h in self.trace.hooks.values()):
            raise RuntimeError("no features recorded: run the model inside interpretation_enabled()")
        if hook_point is not None and hook_point not in self.saes:
            raise ValueError(f"no SAE at hook point {hook_point!r}; SAEs are at {list(self.saes)}")
        points = [hook_point] if hook_point is not None else [hp for hp, h in self.trace.hooks.items() if h._chunks]
        out = {}
        for hp in points:
            dense = self.trace[hp].dense()
            if top_k is None:
                out[hp] = dense
            else:
                values, indices = dense.topk(min(top_k, dense.shape[1]), dim=1)
                out[hp] = (indices, values)
        return out

    # -- steering -------------------------------------------------------------------------------
    def _edits(self, hook_point: str, spec) -> list[FeatureEdit]:
        """Normalise one hook point's steering spec to a checked list of edits."""
        if hook_point not in self.saes:
            raise ValueError(f"no SAE at hook point {hook_point!r}; SAEs are at {list(self.saes)}")
        specs = spec if isinstance(spec, list) else [spec]
        edits = []
        for s in specs:
            if isinstance(s, tuple):  # the seed's (feature_idx, strength): strength multiplies the feature
                if len(s) != 2:
                    raise ValueError(f"steering spec for {hook_point!r} must be (feature_idx, strength), got {s!r}")
                s = scale(*s)
            if not isinstance(s, FeatureEdit):
                raise TypeError(f"steering spec for {hook_point!r} must be (feature_idx, strength) or a FeatureEdit, "
                                f"got {type(s).__name__}")
            d_sae = self.saes[hook_point].d_sae
            if not 0 <= s.feature < d_sae:
                raise IndexError(f"feature index {s.feature} out of range for the SAE at {hook_point!r} "
                                 f"(d_sae={d_sae}, valid 0..{d_sae - 1})")
            edits.append(s)
        features = [e.feature for e in edits]
        if len(set(features)) != len(features):
            raise ValueError(f"steering spec for {hook_point!r} edits a feature twice: {features}")
        return [e for e in edits if not e.is_noop]

    def _steering_delta(self, hook_point: str, plan: _Plan, x: torch.Tensor) -> torch.Tensor:
        """(f' - f) @ W_dec[edited] for the activation x at the SAE's input: [N, d_out]."""
        flat = self._sae_input(hook_point, x)
        if plan.constant is not None:
            return plan.constant.expand(flat.shape[0], -1)
        with torch.no_grad():  # the edited latents' encoder rows alone, where they decide their features
            f = self.saes[hook_point].latent_activations(flat, plan.features)
        if f is None:
            code = self._encode(hook_point, flat)
            if code.row_offsets is None:  # f of each edited latent: match it among the k stored ones
                hit = code.indices.unsqueeze(2) == plan.features
                f = (code.values.unsqueeze(2) * hit).sum(1)
            else:
                f = code.to_dense()[:, plan.features]
        return (f * (plan.a - 1) + plan.b) @ plan.rows  # f' - f, exactly 0 where f' == f

    def _steer_activation(self, hook_point: str, plan: _Plan, x: torch.Tensor) -> torch.Tensor:
        """x + (f' - f) @ W_dec[edited], cast back to x's dtype."""
        return x + self._steering_delta(hook_point, plan, x).reshape(x.shape).to(x.dtype)

    def _transcoder_steering(self, hook_point: str, plan: _Plan) -> list:
        """Hooks that steer a transcoder: its features are read from the input hook point as it
        passes, and the edit (f' - f) @ W_dec[edited] is added at its output hook point."""
        pending = {}

        def read(x):
            pending["delta"] = self._steering_delta(hook_point, plan, x)

        def write(y):
            if plan.constant is not None:
                return y + plan.constant.to(y.dtype)
            if "delta" not in pending:
                raise RuntimeError(f"the transcoder at {hook_point!r} wrote its output hook point before reading "
                                   "its input: a transcoder predicts a later activation")
            return y + pending.pop("delta").reshape(y.shape).to(y.dtype)

        handles = [] if plan.constant is not None else [add_hook(*self._targets[hook_point], read)]
        return handles + [add_hook(*self._output_targets[hook_point], write, prepend=True)]

    @contextlib.contextmanager
    def steering_enabled(self, steering_config: dict):
        """Edit features while the block runs.

        ``steering_config``: {hook_point: spec}, spec one of ``(feature_idx, strength)`` (scale,
        as in the seed API), a ``FeatureEdit`` (``add``, ``clamp``, ``scale``, ``ablate``), or a
        list of those. Errors (unknown hook point, feature out of range) are raised on entry.
        """
        plans = {}
        for hp, spec in steering_config.items():
            edits = self._edits(hp, spec)
            if edits:
                plans[hp] = _Plan(self.saes[hp], edits)
        handles = []
        try:
            for hp, plan in plans.items():
                if hp in self._output_targets:
                    handles += self._transcoder_steering(hp, plan)
                    continue
                module, kind = self._targets[hp]
                # prepend: edits run before tracking hooks, which then see the edited activation
                handles.append(add_hook(module, kind, lambda x, hp=hp, plan=plan: self._steer_activation(hp, plan, x),
                                         prepend=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def steer(self, input_ids: torch.Tensor, feature_id: tuple[str, int], strength: float, mode: str = "scale",
              **generate_kwargs) -> torch.Tensor:
        """Generate from ``input_ids`` with one feature edited (default: scaled by ``strength``).

        Returns the token ids (prompt + generated). See ``generate`` for the keyword arguments.
        """
        hook_point, feature = feature_id
        with self.steering_enabled({hook_point: FeatureEdit(feature, mode, strength)}):
            return self.generate(input_ids, **generate_kwargs)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, kv_cache=None, **kwargs) -> torch.Tensor:
        """Greedy generation. Hugging Face models use their own ``generate`` (kwargs pass through);
        other models are called as ``model(ids)`` per step, or with ``kv_cache`` as
        ``model(ids, kv_cache=kv_cache)``: the prompt once, then one token per step (nanochat)."""
        if _is_hf_generator(self.model):
            kwargs.setdefault("do_sample", False)
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)} for a model "
                            "without Hugging Face generate()")
        ids = input_ids
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self.model(step_input) if kv_cache is None else self.model(step_input, kv_cache=kv_cache)
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id.to(ids.dtype)], 1)
            step_input = ids if kv_cache is None else next_id
        return ids
