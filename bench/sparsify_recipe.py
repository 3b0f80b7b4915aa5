"""EleutherAI sparsify (``pip install eai-sparsify``, a bench-only dependency) driven the way its
own ``Trainer`` drives one ``SparseCoder`` on the FVU loss, so the benches compare fastsae with
sparsify itself on the same rows.

Per step, as ``sparsify.Trainer.fit``: b_dec set to the first batch's mean, decoder rows
renormalised before the forward, FVU (+ auxk_alpha x AuxK loss when dead latents are tracked)
backward, the parallel decoder gradient removed, optimizer and LR-schedule step, tokens since
each latent last fired updated. Optimizers as sparsify builds them: "signum" (its default:
schedule-free SignSGD, momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14); evaluate after
``optimizer.eval()``) or "adam" (lr 2e-4 / sqrt(d_sae / 2^14), linear warmup then linear decay).

A transcoder (``transcode=True``, its ``--transcode``; ``skip_connection`` its skip) is stepped
as its Trainer does one: W_dec starts at zero, the first batch sets the encoder bias to
-mean(x) W_enc^T and b_dec to mean(y), and decoder rows are neither renormalised nor have
their parallel gradient removed.
"""
import importlib.util
import os
import sys
import types

import torch

INSTALL_HINT = "sparsify is not installed: pip install eai-sparsify (a bench-only dependency)"


def have_sparsify() -> bool:
    try:
        import_sparsify()
    except ImportError:
        return False
    return True


def import_sparsify():
    """The sparsify package (SparseCoder, SparseCoderConfig). sparsify picks its decoder once,
    at import: its Triton decode needs a GPU, so without one it is switched off first. Where
    its trainer's dependencies (datasets, transformers) are missing, as on a machine without a
    package registry, the package is loaded without its ``__init__``: the coder needs only its
    own modules."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify
        return sparsify
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = package
    try:
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    except ImportError:
        del sys.modules["sparsify"]
        raise
    package.SparseCoder, package.SparseCoderConfig = SparseCoder, SparseCoderConfig
    return package


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    """sparsify's Adam schedule (transformers' linear schedule with warmup): 0 to lr over the
    warmup, then linearly back to 0 at the last step."""
    def factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SparsifyRun:
    """One sparsify SparseCoder with its optimizer, schedule and dead-latent counts."""

    def __init__(self, d_in, d_sae, k, device, total_steps, optimizer="signum", warmup_steps=1000,
                 auxk_alpha=0.0, dead_after_tokens=10_000_000, seed=0, transcode=False, skip_connection=False):
        sparsify = import_sparsify()
        torch.manual_seed(seed)
        config = sparsify.SparseCoderConfig(num_latents=d_sae, k=k, transcode=transcode,
                                            skip_connection=skip_connection)
        self.coder = sparsify.SparseCoder(d_in, config, device=device)
        self.transcode = transcode
        self.optimizer, self.schedule = self._optimizer(optimizer, total_steps, warmup_steps)
        self.auxk_alpha, self.dead_after_tokens = auxk_alpha, dead_after_tokens
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.steps = 0

    def _optimizer(self, name, total_steps, warmup_steps):
        scale = (self.coder.num_latents / 2**14) ** 0.5
        params = self.coder.parameters()
        if name == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            opt = ScheduleFreeWrapper(SignSGD([{"params": params, "lr": 5e-3 / scale}]), momentum=0.95)
            opt.train()
            return opt, None
        if name == "adam":
            opt = torch.optim.Adam(params, lr=2e-4 / scale)
            return opt, linear_warmup_decay(opt, warmup_steps, total_steps)
        raise ValueError(f"optimizer must be 'signum' or 'adam', got {name!r}")

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """One step on inputs x (and, for a transcoder, targets y)."""
        coder = self.coder
        if self.steps == 0:
            if self.transcode:
                coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
            coder.b_dec.data = (x if y is None else y).mean(0)
        if not self.transcode:
            coder.set_decoder_norm_to_unit_norm()
        dead_mask = self.since_fired > self.dead_after_tokens if self.auxk_alpha > 0 else None
        out = coder(x, y, dead_mask=dead_mask)
        loss = out.fvu + self.auxk_alpha * out.auxk_loss
        loss.backward()
        if not self.transcode:
            coder.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.schedule is not None:
            self.schedule.step()
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        self.since_fired = torch.where(fired, 0, self.since_fired + len(x))
        self.steps += 1
        return out.fvu.detach()

    def finish(self) -> None:
        """Switch to the parameters sparsify saves (the schedule-free average under signum)."""
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()

    @torch.no_grad()
    def encode_decode(self, x: torch.Tensor):
        out = self.coder(x)
        return out.sae_out, out.latent_indices, out.latent_acts
