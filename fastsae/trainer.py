"""SAE training: fast, resumable, data-parallel.

One step: forward (``sae.loss``), backward, gradient all-reduce (data parallel), removal of
each decoder row's parallel gradient, clipping, Adam, decoder renormalisation, dead-latent
bookkeeping. Everything in a step stays on the device; the host waits for it only at
logging, evaluation and checkpoint steps.

Definitions a user may want to know:

* Inputs are scaled by ``s`` (E||s x||^2 = d_in, estimated on a sample) while training; the
  SAEs written to ``best_model`` / ``final_model`` and the trainer's ``sae`` after ``train``
  returns have ``s`` folded in, so they take raw activations. Checkpoints hold the
  training-space weights plus ``s``.
* A latent is dead once it has not fired for ``min(config.dead_tokens_threshold,
  5% of the run's tokens)`` tokens (a transcoder: 10%): the cap lets short runs see (and fix)
  dead latents. Warmup is capped at 10% of the run's steps.
* Data order: for a tensor, epoch e is a permutation of the rows seeded by (config.seed, e);
  step t of the epoch takes the t-th global batch of it, rank r the r-th slice of that batch.
  For an ActivationStore, the store's seeded block shuffle with its rank slicing. Either way a
  checkpoint's step fixes the data position exactly.
* A transcoder trains on [input | target] rows: the input scaled by ``s``, the target by its
  own ``t``; both are folded in.

``train_together`` steps several trainers in lockstep on one read of a shared source.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fastsae import buffers, ops
from fastsae.config import SAEConfig
from fastsae.data import data_source, model_clock, rank_and_world, split_activations
from fastsae.files import atomic_save_tensors, atomic_write, atomic_write_json, atomic_write_text
from fastsae.io import save_sae
from fastsae.models import BaseSAE, create_sae
from fastsae.normalize import estimate_norm_scale, fold_normalization, geometric_median, unfold_normalization

__all__ = ["SAETrainer", "train_sae_from_activations", "resolve_device", "split_activations", "plot_metrics"]

INIT_SAMPLE_ROWS = 8192  # rows for the input scale and the b_dec geometric median
RESAMPLE_SAMPLE_ROWS = 16384  # rows scored when resampling dead latents
CALIBRATION_ROWS = 8192  # rows that set a BatchTopK SAE's inference threshold before it is evaluated or saved
RUN_FRACTION_CAP = 0.1  # warmup (and a transcoder's dead-token threshold) is capped at this fraction of the run
# An SAE's dead-token threshold is capped at this fraction of the run's tokens: on MiniLM block
# 3 at d_sae 12288, 0.1 left 0.8% (89 steps) and 1.0% (178) of the latents dead, 0.05 0.2%, at
# the same FVU; at d_sae 3072 nothing changed. Transcoders keep RUN_FRACTION_CAP (not re-measured).
DEAD_FRACTION_CAP = 0.05
DECAY_FRACTION = 0.2  # linear LR decay to 0 over the last 20% of steps (config.lr_decay)
RESAMPLE_ENCODER_SCALE = 0.2  # resampled encoder rows: 0.2 x mean alive encoder norm
# A TopK-kind SAE's b_enc starts at minus this fraction of each latent's (1 - k / d_sae) quantile
# of pre-activations on the initialisation sample, so every latent starts near the firing rate
# TopK allows: latents whose directions see little variance are not outcompeted from step 1.
# On MiniLM block 3 at 89 steps: d_sae 12288 dead 2.6% -> 0.8%, FVU 0.137 -> 0.120; d_sae
# 3072 at 178 steps FVU 0.120 -> 0.117. The full quantile (1.0) cost FVU on longer runs.
# A target-L0 JumpReLU's b_enc does the same at target_l0 / d_sae (d_sae 12288, target 32,
# 172 steps: FVU 0.111 -> 0.093, dead 62% -> 24%).
ENCODER_BIAS_BALANCE = 0.5
# A target-L0 JumpReLU's thresholds learn this many times faster than its other parameters.
# Adam moves a log-threshold by about the learning rate per step, too slowly to hold L0 while the
# encoder changes under it: on MiniLM block 3 (target 32, 172 steps) runs at 1x ended at L0 30
# (d_sae 3072) and 24 (d_sae 12288), at 10x at 32.4 and 32.0 (README, "Quality").
THRESHOLD_LR_FACTOR = 10
AUX_CHECK_EVERY = 10  # steps between host reads of the dead-latent count (AuxK runs only while it is > 0)
_NEVER = 2**62  # "no bad step yet"
_TOPK_KINDS = ("topk", "batchtopk", "matryoshka_batchtopk")
# AuxK while latents are dead. A dead JumpReLU latent has no entry near its threshold, so no
# other gradient reaches it (target 32, 172 steps: dead 3.2% -> 0.8% at d_sae 3072, 24% -> 17% at
# 12288, FVU unchanged).
_AUXK = (*_TOPK_KINDS, "jumprelu")
_RESAMPLED = ("relu", "gated", "jumprelu")
_PER_LATENT = ("enc_weight", "W_dec", "b_enc", "r_mag", "b_mag", "log_threshold")
# The learning rate when config.learning_rate is None (auto_learning_rate): its value at 2^14
# latents, a batch of 4096 rows and runs of up to AUTO_LR_SHORT_RUN steps, and the power of
# 2^14 / d_sae it scales with. Adam: Gao et al. 2024 ("Scaling and evaluating sparse
# autoencoders", which sparsify follows): 2e-4 / sqrt(d_sae / 2^14). Schedule-free Adam: fitted
# on MiniLM activations (README, "Quality"): its best rate fell far less with width.
AUTO_LR = {"schedule_free_adam": 8.5e-3, "adam": 2e-4}
AUTO_LR_WIDTH_POWER = {"schedule_free_adam": 0.25, "adam": 0.5}
# Schedule-free: a run longer than 100 steps of 4096 rows (409,600 rows) gets lr * sqrt(100 / T),
# T its length in such steps. Counted in rows, not steps: at batch 512 and 1024 (1112 and 556
# steps on MiniLM) the rate from a step count was 2.8x and 2x below the best one.
AUTO_LR_SHORT_RUN = 100
# Transcoders take this many times the rate: on MiniLM block 3's MLP (d_sae 3072, k 32) the best
# schedule-free rate was 1.5x the SAE rule at 79 steps and 2.4x at 237 (README, transcoders).
AUTO_LR_TRANSCODER = 2.0
# beta1 0.95 (the average's weight on the iterate) and beta2 0.99: at ~100 steps on MiniLM they
# kept fewer latents dead than (0.9, 0.999) at the same FVU.
SCHEDULE_FREE_BETAS = (0.95, 0.99)
# Config fields a resumed run may change: they decide when to look and save, not what is learnt.
RESUMABLE_CHANGES = ("eval_every", "save_every", "extra")


# ----------------------------------------------------------------------------- setup helpers

def resolve_device(device) -> torch.device:
    """torch.device for ``device``; CUDA falls back to CPU (with a warning) when absent, and
    under torchrun an index-less "cuda" means this process's LOCAL_RANK GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device 'cuda' was requested but CUDA is not available; training on CPU", stacklevel=3)
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _writable_dir(path) -> Path:
    """Create ``path`` and prove it is writable now, not hours into a run."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise OSError(f"save_dir {str(path)!r} is not a writable directory: {e.strerror or e}") from None
    return path


def auto_learning_rate(optimizer: str, d_sae: int, batch_size: int, total_steps: int,
                       transcoder: bool = False) -> float:
    """The learning rate used when config.learning_rate is None: AUTO_LR scaled by
    (2^14 / d_sae)^AUTO_LR_WIDTH_POWER, by sqrt(batch / 4096) (Adam's square-root rule) and,
    for schedule-free Adam, by sqrt(AUTO_LR_SHORT_RUN / T) beyond a short run, T the run's
    rows / 4096 (its constant rate has no decay to calm a long run), and by
    AUTO_LR_TRANSCODER for a transcoder."""
    lr = AUTO_LR[optimizer] * (2**14 / d_sae) ** AUTO_LR_WIDTH_POWER[optimizer] * math.sqrt(batch_size / 4096)
    if optimizer == "schedule_free_adam":
        lr *= min(1.0, math.sqrt(AUTO_LR_SHORT_RUN / max(total_steps * batch_size / 4096, 1e-9)))
        if transcoder:
            lr *= AUTO_LR_TRANSCODER
    return lr


def _param_groups(sae: BaseSAE, config: SAEConfig) -> list[dict]:
    """The optimizer's parameter groups: one, or for a target-L0 JumpReLU its thresholds apart
    with their learning-rate factor (``lr_factor``, which the trainer applies every step)."""
    if config.target_l0 is None:
        return [{"params": list(sae.parameters())}]
    threshold = sae.log_threshold
    return [{"params": [p for p in sae.parameters() if p is not threshold]},
            {"params": [threshold], "lr_factor": THRESHOLD_LR_FACTOR}]


def _make_optimizer(name: str, params, lr: float, device: torch.device):
    if name == "adam":
        # The fused Adam is one pass over each parameter instead of about ten (7x faster on CPU).
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    from fastsae.schedule_free import BlockedAdamWScheduleFree

    # Warmup comes from lr_at (the trainer sets each step's lr), so the library's is off.
    optimizer = BlockedAdamWScheduleFree(params, lr=lr, betas=SCHEDULE_FREE_BETAS, warmup_steps=0)
    optimizer.train()
    return optimizer


def sample_rows_needed(config: SAEConfig) -> int:
    """The most rows a trainer of this config samples from its data at once (initialisation,
    a BatchTopK threshold's calibration, resampling), so a stream can read them once."""
    resampled = config.activation in _RESAMPLED and config.resample_interval > 0
    return max(INIT_SAMPLE_ROWS, CALIBRATION_ROWS, RESAMPLE_SAMPLE_ROWS if resampled else 0)


def _column_quantiles(x: torch.Tensor, weight: torch.Tensor, q: float, chunk_bytes: int = 1 << 25) -> torch.Tensor:
    """The q-quantile (the ceil(q n)-th smallest value) of each column of x @ weight.T, a
    block of latents at a time (a [n, d_sae] product can be gigabytes)."""
    n = x.shape[0]
    rank = min(max(math.ceil(q * n), 1), n)
    step = max(1, chunk_bytes // (4 * n))
    return torch.cat([(x @ w.t()).kthvalue(rank, dim=0).values for w in weight.split(step)])


# ----------------------------------------------------------------------------- the trainer

class SAETrainer:
    """Train ``sae`` on ``activations`` (Tensor [N, d_in] or an activation store).

    Under torch.distributed (torchrun) every rank builds the same trainer on the same data;
    each reads its slice of every global batch of ``config.batch_size`` rows, and gradients
    are averaged, so N ranks follow the single-process run.
    """

    def __init__(self, sae: BaseSAE, config: SAEConfig, activations, val_activations=None, device="cuda",
                 save_dir=None, log_every: int = 50, keep_checkpoints: int = 3,
                 checkpoint_minutes: float | None = 5.0, metadata: dict | None = None, data_parallel: bool = True):
        if config.dtype == "float16":
            raise ValueError("config.dtype='float16' cannot train: float16 needs loss scaling, which the trainer "
                             "does not do; use 'bfloat16' (autocast on CUDA) or 'float32'")
        if (sae.d_in, sae.d_sae, sae.d_out) != (config.d_in, config.d_sae, config.d_out):
            raise ValueError(f"sae has d_in={sae.d_in}, d_sae={sae.d_sae}, d_out={sae.d_out} but config says "
                             f"d_in={config.d_in}, d_sae={config.d_sae}, d_out={config.d_out}")
        self.config = config
        self.device = resolve_device(device)
        self.sae = sae.to(self.device).train()
        self.data = data_source(activations, "activations", config)
        self.val_data = None if val_activations is None else data_source(val_activations, "val_activations", config)
        self.save_dir = None if save_dir is None else _writable_dir(save_dir)
        self.log_every, self.keep_checkpoints = int(log_every), int(keep_checkpoints)
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"log_every and keep_checkpoints must be >= 1, got {log_every} and {keep_checkpoints}")
        if checkpoint_minutes is not None and not checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be > 0 or None, got {checkpoint_minutes}")
        # A checkpoint also every this many minutes of training, so a killed run loses at most that.
        self.checkpoint_minutes = checkpoint_minutes
        # Written into every saved SAE's cfg.json (e.g. model_name, context_size).
        self.metadata = dict(metadata or {})
        self.resumed_step: int | None = None  # the step a resume=True run found in its checkpoint
        self._last_save_time = time.monotonic()
        self._stop_signal: int | None = None
        # data_parallel=False: this process trains alone even under torch.distributed (each rank
        # its own SAEs, as fastsae train --distribute-modules runs them).
        self.rank, self.world_size = rank_and_world() if data_parallel else (0, 1)
        self.global_batch = min(int(config.batch_size), self.data.num_rows)
        if self.global_batch % self.world_size:
            raise ValueError(f"batch_size {self.global_batch} must be divisible by the world size {self.world_size}")
        self.local_batch = self.global_batch // self.world_size
        self.steps_per_epoch = self.data.num_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"too few activations ({self.data.num_rows}) for one step of {self.global_batch} rows "
                             f"on {self.world_size} rank(s)")
        self.total_steps = self.steps_per_epoch * int(config.num_epochs)
        self.learning_rate = self._resolved_learning_rate()
        self.schedule_free = config.optimizer == "schedule_free_adam"
        self.optimizer = _make_optimizer(config.optimizer, _param_groups(self.sae, config), self.learning_rate,
                                         self.device)
        self.step = 0
        self.scale: float | None = None  # input normalisation, set on the first train()
        self.output_scale: float | None = None  # a transcoder target's (an SAE's: self.scale)
        self.best_val_fvu = math.inf
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.tokens_since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=self.device)
        self._first_bad = torch.full((2,), _NEVER, dtype=torch.long, device=self.device)  # [input, loss]
        self._resample_gen = torch.Generator().manual_seed(config.seed + 1)
        self._folded = False
        self._iterate: list[torch.Tensor] | None = None  # schedule-free: y while the SAE holds the average
        # Dead latents at the last check (every AUX_CHECK_EVERY steps): AuxK runs only while some
        # are, and selects at most that many per token, so a few dead latents cost a few slots.
        self._num_dead = 0
        self._last_log = (time.perf_counter(), 0)

    def _resolved_learning_rate(self) -> float:
        config = self.config
        if config.learning_rate is not None:
            return float(config.learning_rate)
        return auto_learning_rate(config.optimizer, config.d_sae, self.global_batch, self.total_steps,
                                  config.is_transcoder)

    # ---- schedules (plain functions of the step, so a resumed run follows the same curve)
    def lr_at(self, step: int) -> float:
        """Linear warmup, then constant; with optimizer "adam" and lr_decay, a linear decay to 0
        over the last DECAY_FRACTION of the run (schedule-free Adam needs none: it averages)."""
        warmup = min(self.config.warmup_steps, int(RUN_FRACTION_CAP * self.total_steps))
        lr = self.learning_rate * min(1.0, (step + 1) / warmup if warmup > 0 else 1.0)
        if self.config.lr_decay and not self.schedule_free:
            decay_steps = max(1, int(DECAY_FRACTION * self.total_steps))
            lr *= min(1.0, (self.total_steps - step) / decay_steps)
        return lr

    def sparsity_scale_at(self, step: int) -> float:
        warm = self.config.l1_warmup_steps
        return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)

    @property
    def dead_tokens_threshold(self) -> int:
        cap = RUN_FRACTION_CAP if self.config.is_transcoder else DEAD_FRACTION_CAP
        run_tokens = self.total_steps * self.global_batch
        return min(int(self.config.dead_tokens_threshold), max(self.global_batch, int(cap * run_tokens)))

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired > self.dead_tokens_threshold

    # ---- data
    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Training rows as the SAE trains on them: the input (and a transcoder's target) scaled."""
        x = x.to(self.device, torch.float32, non_blocking=True)
        if not self.config.is_transcoder:
            return x * self.scale
        d_in = self.config.d_in
        return torch.cat([x[:, :d_in] * self.scale, x[:, d_in:] * self.output_scale], 1)

    def _batches(self, step: int, data=None):
        """This rank's raw batches from ``step`` to the end of that step's epoch, of this
        trainer's data or, for train_together, of the ``data`` its ColumnSlice cuts."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return (data or self.data).epoch_batches(epoch, pos, self.steps_per_epoch, self.config.seed,
                                                 self.global_batch, self.rank, self.world_size)

    def batch_at(self, step: int) -> torch.Tensor:
        """This rank's normalised batch of ``step``."""
        return self._normalized(next(iter(self._batches(step))))

    def _sample_rows(self, n: int, seed_offset: int) -> torch.Tensor:
        """Up to n rows spread over the data (the same on every rank)."""
        return self.data.sample(n, self.config.seed * 1_000_003 + seed_offset).float()

    @torch.no_grad()
    def _initialise(self) -> None:
        """Input scale and b_dec (geometric median of the scaled sample's targets) for a fresh run;
        a transcoder's b_enc centres its pre-activations at the inputs' geometric median."""
        inputs, targets = self.sae.split_rows(self._sample_rows(INIT_SAMPLE_ROWS, seed_offset=2))
        normalize = self.config.normalize_activations
        self.scale = estimate_norm_scale(inputs) if normalize else 1.0
        self.output_scale = self.scale if not self.config.is_transcoder else (
            estimate_norm_scale(targets) if normalize else 1.0)
        self.sae.b_dec.copy_(geometric_median(targets * self.output_scale).to(self.device))
        scaled = inputs.to(self.device) * self.scale
        rate = self._firing_rate()
        if rate is not None and not self.config.is_transcoder:
            x = scaled - self.sae.b_dec
            self.sae.b_enc.copy_(-ENCODER_BIAS_BALANCE * _column_quantiles(x, self.sae.enc_weight, 1 - rate))
        if self.config.is_transcoder:
            # No b_dec is subtracted from a transcoder's input, so the encoder bias centres the
            # pre-activations instead: an MLP input's large mean would otherwise keep the
            # latents that point away from it silent from the first step.
            centre = geometric_median(inputs * self.scale).to(self.device)
            self.sae.b_enc.copy_(-(self.sae.enc_weight @ centre))
        if self.config.target_l0 is not None:
            self.sae.log_threshold.copy_(self._target_log_thresholds(scaled))

    def _firing_rate(self) -> float | None:
        """The fraction of tokens each latent fires on when latents share a set L0 evenly: k /
        d_sae for the TopK kinds, target_l0 / d_sae for a target-L0 JumpReLU; else None."""
        cfg = self.config
        if cfg.activation in _TOPK_KINDS:
            return min(cfg.k / cfg.d_sae, 1.0)
        return None if cfg.target_l0 is None else cfg.target_l0 / cfg.d_sae

    def _target_log_thresholds(self, inputs: torch.Tensor, latents=slice(None)) -> torch.Tensor:
        """log of each latent's (1 - target_l0 / d_sae) pre-activation quantile on the (scaled)
        ``inputs``, at least jumprelu_init_threshold: thresholds at which the latents fire at the
        target's rate, so a target-L0 JumpReLU starts at its target."""
        sae = self.sae
        x = inputs if sae.input_bias is None else inputs - sae.input_bias
        quantiles = _column_quantiles(x, sae.enc_weight[latents], 1 - self._firing_rate()) + sae.b_enc[latents]
        return quantiles.clamp_min(self.config.jumprelu_init_threshold).log()

    # ---- one step
    def _autocast(self):
        """bfloat16 autocast on CUDA when config.dtype asks for it (the seed's default)."""
        enabled = self.device.type == "cuda" and self.config.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimisation step on this rank's normalised batch ``x``; returns sae.loss's dict."""
        aux = {"dead_mask": self.dead_mask(), "max_aux_k": self._num_dead} if self._num_dead else {}
        # The last step's gradients go before the forward: their memory is free for it (on CPU
        # fastsae.buffers puts the encoder's bf16 copy there) instead of adding to its peak.
        self.optimizer.zero_grad(set_to_none=True)
        with buffers.kept():
            with self._autocast():
                out = self.sae.loss(x, sparsity_scale=self.sparsity_scale_at(self.step), **aux)
            out["total_loss"].backward()
        fired = _fire_counts(out["code"], self.config.d_sae)
        bad = torch.stack([~ops.all_finite(x), ~torch.isfinite(out["total_loss"].detach())])
        if self.world_size > 1:
            fired, bad = self._all_reduce(fired, bad)
        if self.config.normalize_decoder:
            self.sae.remove_parallel_decoder_grad()
        if self.config.grad_clip:
            _clip_grad_norm(self.sae.parameters(), self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_factor", 1)
        self.optimizer.step()
        if self.config.normalize_decoder:
            self.sae.normalize_decoder_weights()
        self.tokens_since_fired = torch.where(fired > 0, 0, self.tokens_since_fired + self.global_batch)
        self._first_bad = torch.minimum(self._first_bad, torch.where(bad, self.step, _NEVER))
        self.step += 1
        return out

    def _all_reduce(self, fired, bad):
        """Average gradients and sum fire counts and NaN flags across ranks in one collective."""
        params = list(self.sae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [fired, bad.float()])
        dist.all_reduce(flat)
        n_grad = flat.numel() - fired.numel() - 2
        flat[:n_grad].div_(self.world_size)
        for p, g in zip(params, torch.split(flat[:n_grad], [g.numel() for g in grads])):
            p.grad = g.view_as(p)
        return flat[n_grad:-2], flat[-2:] > 0

    def _raise_if_nonfinite(self) -> None:
        """Stop on the first non-finite batch or loss (a host sync: called only at log/save steps)."""
        first_input, first_loss = self._first_bad.tolist()
        if min(first_input, first_loss) == _NEVER:
            return
        what = "activations contain NaN or Inf" if first_input <= first_loss else "the loss became NaN or Inf"
        step = min(first_input, first_loss) + 1  # steps are counted from 1 in logs and checkpoints
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was saved")
        raise FloatingPointError(f"training stopped at step {step} (epoch {(step - 1) // self.steps_per_epoch}): "
                                 f"{what} in that step's batch; {kept}")

    # ---- the loop
    def train(self, num_epochs: int | None = None, verbose: bool = True, resume: bool = False,
              max_steps: int | None = None) -> list[dict]:
        """Train for ``num_epochs`` (default config.num_epochs). ``resume=True`` continues from the
        latest checkpoint in save_dir; ``max_steps`` stops early (with a checkpoint) without
        changing the schedule, so a later resume follows the uninterrupted run exactly."""
        from fastsae.progress import progress_bar

        stop = self._begin(num_epochs, resume, max_steps)
        bar = progress_bar(total=self.total_steps, initial=self.step, disable=not verbose or self.rank != 0,
                           desc="train SAE", unit="step", dynamic_ncols=True)
        with _stoppable([self], bar):
            while self.step < stop:
                for x in self._batches(self.step):
                    self._advance(x, bar, stop)
                    bar.update(1)
                    if self.step == stop or self._stop_signal is not None:
                        break
                _raise_if_signalled([self])
        return self._end()

    def _begin(self, num_epochs, resume: bool, max_steps) -> int:
        """Everything before the first step of a train() call (resume, the input scale, the
        training parametrisation back after an earlier call); returns the step to stop at."""
        for name, value in (("num_epochs", num_epochs), ("max_steps", max_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if num_epochs is not None:
            self.total_steps = self.steps_per_epoch * int(num_epochs)
            self.learning_rate = self._resolved_learning_rate()
        if resume:
            self._resume_latest()
        if self.step == 0:
            self._start_metrics()
        if self._folded:
            if self._iterate is not None:  # the SAE held the folded average: back to the iterate y,
                with torch.no_grad():      # kept in the training space, so nothing to unfold
                    for p, y in zip(self.sae.parameters(), self._iterate):
                        p.copy_(y)
                self._iterate = None
            else:
                unfold_normalization(self.sae, self.scale, self.output_scale)
            self._folded = False
        if self.scale is None:
            self._initialise()
        self._write_config()
        self._last_log = (time.perf_counter(), self.step)
        self._run_start = (time.perf_counter(), self.step, model_clock(self.data))
        self._last_save_time = time.monotonic()
        self.sae.train()
        return self.total_steps if max_steps is None else min(self.total_steps, int(max_steps))

    def _advance(self, x: torch.Tensor, bar, stop: int) -> None:
        """One step on this rank's raw batch x, then the logging, evaluation and checkpoints due."""
        out = self.train_step(self._normalized(x))
        self._after_step(out, bar, last=self.step == stop)

    def _end(self) -> list[dict]:
        """After the last step of a train() call: the final model, and the SAE left as it is
        saved (the schedule-free average, the scale folded in, a calibrated threshold)."""
        if self.step == self.total_steps:
            self._finish()
        if self.schedule_free:  # the trained SAE is the average of the iterates
            self._iterate = [p.detach().clone() for p in self.sae.parameters()]
            self._load_average_into(self.sae)
        fold_normalization(self.sae, self.scale, self.output_scale)
        if hasattr(self.sae, "calibrate_threshold"):
            self.sae.calibrate_threshold(self._calibration_rows())  # raw rows: the scale is folded in
        self._folded = True
        buffers.release()  # the step-to-step buffers, until the next train() call
        return self.history

    def _after_step(self, out: dict, bar, last: bool) -> None:
        step, cfg = self.step, self.config
        if cfg.activation in _AUXK and step % AUX_CHECK_EVERY == 0:
            self._num_dead = int(self.dead_mask().sum())
        if step % self.log_every == 0 or last:
            self._log(out, bar)
        if cfg.activation in _RESAMPLED and cfg.resample_interval > 0 and step % cfg.resample_interval == 0:
            self.resample_dead_latents()
        if self.val_data is not None and (step % cfg.eval_every == 0 or last):
            self._raise_if_nonfinite()
            self._evaluate_and_keep_best()
        minutes = self.checkpoint_minutes
        due = minutes is not None and time.monotonic() - self._last_save_time >= 60 * minutes
        if step % cfg.save_every == 0 or last or due:
            self._raise_if_nonfinite()
            self._save_checkpoint()

    def _log(self, out: dict, bar) -> None:
        self._raise_if_nonfinite()
        now, (then, then_step) = time.perf_counter(), self._last_log
        tokens_per_s = (self.step - then_step) * self.global_batch / max(now - then, 1e-9)
        self._last_log = (now, self.step)
        record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                  "tokens": self.step * self.global_batch, "lr": self.lr_at(self.step - 1),
                  "tokens_per_s": tokens_per_s, "dead_fraction": self.dead_mask().float().mean().item()}
        for key in ("total_loss", "mse_loss", "fvu", "l0", "aux_loss", "l1_loss", "l0_loss"):
            if key in out:
                record[key] = float(out[key].detach().float())
        for key in out:  # a Matryoshka SAE's FVU of each inner prefix
            if key.startswith("prefix_") and key.endswith("_fvu"):
                record[key] = float(out[key].detach().float())
        rates = self._model_and_sae_rates(now)
        record.update(rates)
        self._record(record)
        shown = {"tok_s": f"{tokens_per_s:,.0f}"} if not rates else {
            "model_tok_s": f"{rates['model_tokens_per_s']:,.0f}", "sae_tok_s": f"{rates['sae_tokens_per_s']:,.0f}"}
        bar.set_postfix(**shown, fvu=f"{record['fvu']:.4f}", l0=f"{record['l0']:.1f}",
                        dead=f"{100 * record['dead_fraction']:.1f}%", refresh=False)

    def _model_and_sae_rates(self, now: float) -> dict:
        """For a stream, since this train() call began: the model's tokens/s (rows it gave over
        the time spent waiting for it, the all-gather under torchrun included) and the SAE
        steps' tokens/s (tokens trained over the rest of the time; with train_together, every
        SAE's steps). {} for stored activations."""
        (start, start_step, then), clock = self._run_start, model_clock(self.data)
        if clock is None or then is None or clock[0] <= then[0]:
            return {}
        model_s, rows = clock[0] - then[0], clock[1] - then[1]
        sae_s = max(now - start - model_s, 1e-9)
        return {"model_tokens_per_s": rows / model_s,
                "sae_tokens_per_s": (self.step - start_step) * self.global_batch / sae_s}

    def _start_metrics(self) -> None:
        """A run that starts at step 0 starts a new metrics.jsonl (a killed run that saved no
        checkpoint would otherwise leave its lines in front of the new run's)."""
        log = None if self.save_dir is None else self.save_dir / "metrics.jsonl"
        if log is not None and self.rank == 0 and log.exists():
            log.unlink()

    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.save_dir is not None and self.rank == 0:
            with open(self.save_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ---- validation and saved models
    @torch.no_grad()
    def evaluate(self, batch_size: int | None = None) -> float:
        """FVU on the validation rows (in the normalised space; FVU does not depend on the scale)."""
        if self.val_data is None:
            raise ValueError("no val_activations were given")
        batch_size = batch_size or self.global_batch
        sae = self._model_for_eval()
        was_training = sae.training
        sae.eval()
        err = sum_x = sum_sq = 0.0
        n = self.val_data.num_rows
        with ops.input_checks(False), self._autocast():
            for raw in self.val_data.sequential(batch_size):
                # After train() returns, the SAE has the scale folded in and takes raw rows.
                x = raw.to(self.device, torch.float32) if self._folded else self._normalized(raw)
                if not bool(torch.isfinite(x).all()):
                    raise FloatingPointError("the validation activations contain NaN or Inf; "
                                             "the validation FVU would be meaningless")
                target = sae.split_rows(x)[1].float()
                recon = sae.loss(x)["reconstruction"].float()
                err = err + (recon - target).pow(2).sum().double()
                sum_x = sum_x + target.double().sum(0)
                sum_sq = sum_sq + target.double().pow(2).sum()
        sae.train(was_training)
        total_var = sum_sq - sum_x.pow(2).sum() / n
        fvu = float(err / total_var)
        if not math.isfinite(fvu):
            raise FloatingPointError(f"the validation FVU is {fvu}: the SAE's reconstructions overflow")
        return fvu

    def _evaluate_and_keep_best(self) -> None:
        if self.rank != 0:
            return
        fvu = self.evaluate()
        self._record({"step": self.step, "val_fvu": fvu})
        if fvu < self.best_val_fvu:
            self.best_val_fvu = fvu
            if self.save_dir is not None:
                self.save_raw_sae(self.save_dir / "best_model", val_fvu=fvu)

    @torch.no_grad()
    def _load_average_into(self, sae: BaseSAE) -> None:
        """Schedule-free Adam trains the iterate y; the SAE it returns is the average x, which the
        library's eval() computes as x = y + (1 - 1/beta1) (z - y). Done here into ``sae`` (the
        trained SAE or a copy of it) from self.sae's y and z, so y itself is never round-tripped."""
        beta1 = self.optimizer.param_groups[0]["betas"][0]  # as the optimizer (or its checkpoint) has it
        for averaged, live in zip(sae.parameters(), self.sae.parameters()):
            z = self.optimizer.state.get(live, {}).get("z")
            if z is not None:
                averaged.copy_(torch.lerp(live, z, 1 - 1 / beta1))

    def _model_for_eval(self) -> BaseSAE:
        """The SAE as it would be saved now, in the training space once training is over (a
        copy under schedule-free Adam: the iterate being trained stays as it is). A BatchTopK
        SAE's copy gets its inference threshold calibrated on a sample of the data."""
        calibrate = hasattr(self.sae, "calibrate_threshold")
        if self._folded or not (self.schedule_free or calibrate):
            return self.sae  # (train() calibrated it when it finished)
        sae = copy.deepcopy(self.sae)
        if self.schedule_free:
            self._load_average_into(sae)
        if calibrate:
            sae.calibrate_threshold(self._normalized(self._calibration_rows()))
        return sae

    def _calibration_rows(self) -> torch.Tensor:
        return self._sample_rows(CALIBRATION_ROWS, seed_offset=1).to(self.device)

    def raw_sae(self) -> BaseSAE:
        """A copy of the SAE that takes raw (unnormalised) activations."""
        sae = self._model_for_eval()
        sae = copy.deepcopy(sae) if sae is self.sae else sae
        if not self._folded:
            fold_normalization(sae, self.scale, self.output_scale)
        return sae.eval()

    def save_raw_sae(self, path, **metadata) -> Path:
        scales = {"normalization_scale": self.scale}
        if self.config.is_transcoder:
            scales["output_normalization_scale"] = self.output_scale
        return save_sae(self.raw_sae(), self.config, path, step=self.step, **scales, **{**self.metadata, **metadata})

    def _finish(self) -> None:
        if self.save_dir is None or self.rank != 0:
            return
        self.save_raw_sae(self.save_dir / "final_model", best_val_fvu=self.best_val_fvu)
        try:
            plot_metrics(self.save_dir / "metrics.jsonl", self.save_dir / "loss_curves.png")
        except Exception as e:  # a missing plot must not cost a finished run
            warnings.warn(f"could not plot the loss curves: {e}", stacklevel=2)

    def _write_config(self) -> None:
        """config.json: the config, and what the run made of it (the learning rate it used when
        the config left it automatic, its length and batch)."""
        if self.save_dir is not None and self.rank == 0:
            run = {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                   "global_batch": self.global_batch, "train_rows": self.data.num_rows,
                   "world_size": self.world_size}
            atomic_write_json(self.save_dir / "config.json", {**self.config.to_dict(), "run": run})

    # ---- dead-latent resampling (ReLU / Gated / JumpReLU)
    @torch.no_grad()
    def resample_dead_latents(self) -> int:
        """Re-initialise dead latents towards inputs the SAE reconstructs badly; returns how many.

        Inputs are drawn with probability proportional to their squared reconstruction error;
        a dead latent's decoder row becomes the unit direction of its target (minus b_dec), its
        encoder row the same direction (a transcoder's: its input's) at 0.2x the mean alive
        encoder norm, its biases zero, and its Adam moments are cleared so stale statistics do
        not fling it straight away.
        """
        dead = self.dead_mask().nonzero().flatten()
        if dead.numel() == 0:
            return 0
        x = self._normalized(self._sample_rows(RESAMPLE_SAMPLE_ROWS, seed_offset=3 + self.step))
        weights = self._squared_errors(x).cpu().double()
        if not bool((weights > 0).any()):
            weights = torch.ones_like(weights)
        replace = dead.numel() > int((weights > 0).sum())
        pick = torch.multinomial(weights, dead.numel(), replacement=replace, generator=self._resample_gen)
        inputs, targets = self.sae.split_rows(x[pick.to(self.device)])
        directions = _unit_rows(targets - self.sae.b_dec)
        enc_directions = _unit_rows(inputs) if self.config.is_transcoder else directions
        alive = ~self.dead_mask()
        enc_norm = self.sae.enc_weight[alive].norm(dim=1).mean() if bool(alive.any()) else torch.tensor(1.0)
        sae = self.sae
        sae.W_dec[dead] = directions
        sae.enc_weight[dead] = enc_directions * (RESAMPLE_ENCODER_SCALE * enc_norm)
        sae.b_enc[dead] = 0.0
        if hasattr(sae, "r_mag"):
            sae.r_mag[dead] = 0.0
            sae.b_mag[dead] = 0.0
        if self.config.target_l0 is not None:  # firing at the target's rate, as at the start
            sae.log_threshold[dead] = self._target_log_thresholds(self.sae.split_rows(x)[0], dead)
        elif hasattr(sae, "log_threshold"):
            sae.log_threshold[dead] = math.log(self.config.jumprelu_init_threshold)
        self._reset_adam_rows(dead)
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    def _squared_errors(self, x: torch.Tensor) -> torch.Tensor:
        errs = []
        for chunk in x.split(self.global_batch):
            target = self.sae.split_rows(chunk)[1].float()
            errs.append((self.sae.loss(chunk)["reconstruction"].float() - target).pow(2).sum(1))
        return torch.nan_to_num(torch.cat(errs), nan=0.0, posinf=0.0)

    def _reset_adam_rows(self, rows: torch.Tensor) -> None:
        """Forget the optimizer's memory of re-initialised latents (schedule-free: the average
        restarts at the new weights too)."""
        for name, p in self.sae.named_parameters():
            state = self.optimizer.state.get(p)
            if name in _PER_LATENT and state:
                state["exp_avg_sq"][rows] = 0.0
                if "exp_avg" in state:
                    state["exp_avg"][rows] = 0.0
                if "z" in state:
                    state["z"][rows] = p.detach()[rows]

    # ---- checkpoints
    def _save_checkpoint(self) -> None:
        """save_dir/checkpoints/step_{N}/: training-space weights, Adam state, trainer state.
        Written to a temporary directory and renamed, so a checkpoint is whole or absent."""
        if self.save_dir is None or self.rank != 0:
            return
        root = self.save_dir / "checkpoints"
        final, tmp = root / f"step_{self.step}", root / f".step_{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
            tensors["trainer.tokens_since_fired"] = self.tokens_since_fired
            atomic_save_tensors(tmp / "state.safetensors", tensors)
            opt_tensors, groups = _flatten_optimizer(self.optimizer)
            atomic_save_tensors(tmp / "optimizer.safetensors", opt_tensors, metadata={"param_groups": groups})
            atomic_write_json(tmp / "trainer_state.json", self._trainer_state())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "none was saved"
            raise OSError(f"could not save the step {self.step} checkpoint in {root} ({e}); {kept}") from e
        self.last_checkpoint = final
        self._last_save_time = time.monotonic()
        self._prune_checkpoints(root)

    def _trainer_state(self) -> dict:
        rng = {"resample": self._resample_gen.get_state().tolist(), "torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return {"format": 1, "step": self.step, "epoch": self.step // self.steps_per_epoch,
                "position_in_epoch": self.step % self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.global_batch, "total_steps": self.total_steps, "world_size": self.world_size,
                "best_val_fvu": None if math.isinf(self.best_val_fvu) else self.best_val_fvu,
                "normalization_scale": self.scale, "output_normalization_scale": self.output_scale,
                "num_dead": self._num_dead, "rng": rng,
                "config": self.config.to_dict()}

    def _prune_checkpoints(self, root: Path) -> None:
        for old in _checkpoint_dirs(root)[:-self.keep_checkpoints or None]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume_latest(self) -> None:
        found = _checkpoint_dirs(self.save_dir / "checkpoints") if self.save_dir is not None else []
        if not found:
            warnings.warn("resume=True but no checkpoint found in save_dir; starting from scratch", stacklevel=3)
            return
        self.load_checkpoint(found[-1])
        self.resumed_step = self.step

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint directory (or the latest under a save_dir / checkpoints dir)."""
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            found = _checkpoint_dirs(path / "checkpoints") or _checkpoint_dirs(path)
            if not found:
                raise FileNotFoundError(f"{path} is not a trainer checkpoint (no trainer_state.json) "
                                        "and holds no checkpoints/step_N/")
            path = found[-1]
        state = _read_json(path / "trainer_state.json")
        changed = config_changes(state.get("config", {}), self.config.to_dict())
        if changed:
            raise ValueError(f"cannot resume {path}: it was trained with other settings ({'; '.join(changed)}); "
                             "rerun with the checkpoint's settings, or train into a new output directory")
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"checkpoint {path} was trained with a global batch of {state['global_batch']} rows, "
                             f"this trainer uses {self.global_batch}; the data order would not match")
        tensors = load_file(str(path / "state.safetensors"), device=str(self.device))
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.tokens_since_fired = tensors["trainer.tokens_since_fired"].to(self.device)
        self.optimizer.load_state_dict(_unflatten_optimizer(path / "optimizer.safetensors"))
        self.step, self.total_steps = int(state["step"]), int(state["total_steps"])
        self.learning_rate = self._resolved_learning_rate()
        self.scale = state["normalization_scale"]
        self.output_scale = state.get("output_normalization_scale", self.scale)
        if "num_dead" in state:
            self._num_dead = int(state["num_dead"])
        else:  # a checkpoint from before the count was kept: it recorded only whether AuxK was on
            self._num_dead = int(self.dead_mask().sum()) if state.get("aux_on") else 0
        self.best_val_fvu = math.inf if state["best_val_fvu"] is None else float(state["best_val_fvu"])
        self._resample_gen.set_state(torch.tensor(state["rng"]["resample"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
        self._first_bad.fill_(_NEVER)
        self._folded, self._iterate = False, None
        self.last_checkpoint = path
        self._trim_metrics(self.step)

    def _trim_metrics(self, step: int) -> None:
        """Drop logged lines from beyond the checkpoint, which the resumed run will log again."""
        self.history = [r for r in self.history if r["step"] <= step]
        log = None if self.save_dir is None else self.save_dir / "metrics.jsonl"
        if log is None or self.rank != 0 or not log.exists():
            return
        kept = [r for r in read_metrics(log) if r.get("step", 0) <= step]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))


@contextlib.contextmanager
def _stop_at_step_end(trainers):
    """While training, SIGINT and SIGTERM finish the current step, save a checkpoint and raise
    KeyboardInterrupt (a second SIGINT interrupts at once). A stop in the middle of a step
    would save a half-applied update; a stop between steps resumes bit-identically."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def request_stop(signum, frame):
        if signum == signal.SIGINT and trainers[0]._stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        for t in trainers:
            t._stop_signal = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    for t in trainers:
        t._stop_signal = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for t in trainers:
            t._stop_signal = None


@contextlib.contextmanager
def _stoppable(trainers, bar):
    """The training loop's frame: NaN scans off (they would sync every op; they are checked at
    log steps instead), a stop signal ends the step, and an interrupt saves a checkpoint."""
    try:
        with ops.input_checks(False), _stop_at_step_end(trainers):
            yield
    except KeyboardInterrupt:
        for t in trainers:
            t._raise_if_nonfinite()
            t._save_checkpoint()
        raise
    finally:
        bar.close()


def _raise_if_signalled(trainers) -> None:
    signum = trainers[0]._stop_signal
    if signum is not None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def train_together(trainers: list[SAETrainer], verbose: bool = True, resume: bool = False,
                   max_steps: int | None = None) -> list[list[dict]]:
    """Train several SAEs in lockstep from one read of their shared source: each trainer's data
    is a ``fastsae.data.ColumnSlice`` of the same source (a StreamSource over several hook
    points, say), so each batch is read, and the model run, once for all of them, and each SAE
    trains on its columns. Each ends equal to one trained alone on its slice (the same batches
    in the same order). The trainers must agree on the batch, the run's length and the seed;
    ``resume`` needs them at the same step. Returns each trainer's history."""
    from fastsae.data import ColumnSlice
    from fastsae.progress import progress_bar

    if not trainers:
        raise ValueError("trainers is empty")
    first = trainers[0]
    source = getattr(first.data, "source", None)
    for t in trainers:
        if not isinstance(t.data, ColumnSlice) or t.data.source is not source:
            raise ValueError("train_together needs every trainer's activations to be a ColumnSlice of one source "
                             "object (slice the same StreamSource, TensorSource or StoreSource)")
        run = (t.global_batch, t.steps_per_epoch, t.total_steps, t.config.seed, t.rank, t.world_size)
        if run != (first.global_batch, first.steps_per_epoch, first.total_steps, first.config.seed, first.rank,
                   first.world_size):
            raise ValueError("train_together needs the same batch, run length and seed for every SAE; "
                             f"{t.config.hook_point} differs from {first.config.hook_point}")
    stop = [t._begin(None, resume, max_steps) for t in trainers][0]  # the same for all: same run, same max_steps
    if len({t.step for t in trainers}) > 1:
        raise ValueError(f"the SAEs resumed at different steps ({sorted({t.step for t in trainers})}); "
                         "train them one by one to bring them level")
    bar = progress_bar(total=first.total_steps, initial=first.step, disable=not verbose or first.rank != 0,
                       desc=f"train {len(trainers)} SAEs", unit="step", dynamic_ncols=True)
    with _stoppable(trainers, bar):
        while first.step < stop:
            for x in first._batches(first.step, source):
                for t in trainers:
                    t._advance(t.data.columns(x), bar, stop)
                bar.update(1)
                if first.step == stop or first._stop_signal is not None:
                    break
            _raise_if_signalled(trainers)
    return [t._end() for t in trainers]


def config_changes(saved: dict, current: dict) -> list[str]:
    """"field: saved -> current" for each setting a resumed run may not change."""
    keys = sorted((set(saved) | set(current)) - set(RESUMABLE_CHANGES))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a kill (only the last can be) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _clip_grad_norm(params, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_, which is get_total_norm, then clip_grads_with_norm_
    scaling every gradient by min(1, max_norm / (norm + 1e-6)). On CPU that scaling, a read and
    a write of every gradient, is skipped where the factor is 1, as it usually is (about 0.08
    against the default 1 in the training benchmark's steps); a host sync costs nothing there.
    A GPU (or a torch without those two functions) keeps torch's sync-free call."""
    params = [p for p in params if p.grad is not None]
    utils = torch.nn.utils
    if params and params[0].grad.device.type == "cpu" and hasattr(utils, "clip_grads_with_norm_"):
        norm = utils.get_total_norm([p.grad for p in params])
        if not bool(max_norm / (norm + 1e-6) >= 1.0):  # torch's factor, clamped to 1: unchanged gradients
            utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    utils.clip_grad_norm_(params, max_norm)


def _fire_counts(code, d_sae: int) -> torch.Tensor:
    """How many tokens of the batch each latent fired on (float [d_sae], no host sync)."""
    values, indices = code.flat()
    return torch.zeros(d_sae, device=values.device).index_add_(0, indices, (values.detach() > 0).float())


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.json").exists()
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _flatten_optimizer(optimizer) -> tuple[dict, str]:
    """Adam state as flat tensors "{param_index}.{exp_avg|exp_avg_sq|step}" plus JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{key}": torch.as_tensor(value) for i, s in sd["state"].items() for key, value in s.items()}
    return tensors, json.dumps(sd["param_groups"])


def _unflatten_optimizer(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for name in f.keys():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = f.get_tensor(name)
    return {"state": state, "param_groups": groups}


def plot_metrics(metrics_path, png_path) -> Path:
    """Loss, FVU, L0 and dead fraction against step, from a metrics.jsonl, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    panels = [("total_loss", "loss", True), ("fvu", "FVU", True), ("l0", "L0", False),
              ("dead_fraction", "dead fraction", False)]
    for i, (key, title, log_y) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label="train")
        if key == "fvu":
            val = [(r["step"], r["val_fvu"]) for r in records if "val_fvu" in r]
            if val:  # markers: a short run has one or two evaluations, which a line alone would hide
                ax.plot(*zip(*val), linestyle="--", marker="o", label="validation")
            if pts or val:
                ax.legend()
        if log_y and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    return atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))


def train_sae_from_activations(activations, config: SAEConfig, val_split: float = 0.1, device="cuda",
                               save_dir=None, verbose: bool = True, **trainer_kwargs):
    """Build an SAE from ``config``, train it on ``activations`` (a random ``val_split`` held out
    for validation) and return (sae, trainer); the SAE takes raw activations."""
    if isinstance(activations, torch.Tensor):
        train_rows, val_rows = split_activations(activations, val_split, config.seed)
    else:
        train_rows, val_rows = activations, None
    sae = create_sae(config)
    trainer = SAETrainer(sae, config, train_rows, val_rows, device=device, save_dir=save_dir, **trainer_kwargs)
    trainer.train(verbose=verbose)
    return trainer.sae, trainer
