"""SAELens (``pip install sae-lens``, a bench-only dependency) training its own TopK SAE, so the
benches compare fastsae with SAELens itself on the same rows.

The SAE is ``sae_lens.TopKTrainingSAE`` built from ``TopKTrainingSAEConfig`` with its defaults
(float32, b_dec subtracted from the input, decoder rows initialised to norm 0.1 with
W_enc = W_dec.T, pre-activations scaled by the decoder row norms, dense TopK activations, AuxK
coefficient 1). The step is SAELens's own trainer, ``sae_lens.SAETrainer``, driven as its
``fit`` loop drives it: ``maybe_reset_sparsity``, then ``SAETrainer.step`` (which runs
``_train_step``: ``TrainingSAE.training_forward_pass`` on a ``TrainStepInput`` carrying the
trainer's dead-latent mask, i.e. MSE summed over features and averaged over tokens plus
``TopKTrainingSAE.calculate_topk_aux_loss`` when latents are dead; the fired-latent and
frequency counters; backward; ``clip_grad_norm_(1.0)``; Adam; LR-schedule step), then
``n_training_steps += 1``. The trainer is configured with ``SAETrainerConfig``'s defaults, which
are also ``LanguageModelSAERunnerConfig``'s: Adam lr 3e-4, betas (0.9, 0.999), constant schedule,
a latent dead after 1000 steps without firing. Wandb logging, evals, checkpoints and the
progress bar are off or left out: none of them is part of the optimisation.

``finish`` then ends training as ``fit`` and the LLM training runner do: the final metadata, then
``save_inference_model`` (which folds the decoder row norms into W_enc and b_enc, as
``rescale_acts_by_decoder_norm`` requires, and keeps the inference config) and
``SAE.load_from_disk``, giving the inference ``TopKSAE`` that ``encode_decode`` runs in eval mode.
There is no activation scaler to fold: ``normalize_activations`` defaults to "none".
"""
import tempfile

import torch

INSTALL_HINT = "SAELens is not installed: pip install sae-lens (a bench-only dependency)"


def have_saelens() -> bool:
    try:
        import sae_lens  # noqa: F401  (slow: it pulls in transformer_lens, so only when asked)
    except ImportError:
        return False
    return True


class SAELensRun:
    """One SAELens TopKTrainingSAE with SAELens's SAETrainer (its Adam, schedule and dead-latent counts)."""

    def __init__(self, d_in, d_sae, k, device, batch_size, total_steps=10**6, seed=0, lr=None):
        """``lr`` None: SAETrainerConfig's default (3e-4); ``total_steps`` sizes its LR schedule."""
        from sae_lens.config import SAETrainerConfig

        torch.manual_seed(seed)
        device = str(torch.device(device))
        self.k, self.device, self.inference_sae = k, device, None
        self.sae = self.make_sae(d_in, d_sae, k, device)
        self.lr = SAETrainerConfig.lr if lr is None else lr
        cfg = SAETrainerConfig(total_training_samples=total_steps * batch_size, train_batch_size_samples=batch_size,
                               lr=self.lr, lr_end=self.lr / 10, device=device)  # lr_end as the runner config sets it
        # The data provider is only read by fit() and evals; the benches hand each batch to step().
        from sae_lens import SAETrainer

        self.trainer = SAETrainer(cfg=cfg, sae=self.sae, data_provider=iter(()))

    def make_sae(self, d_in, d_sae, k, device):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))

    def mark_dead(self, index) -> None:
        """Count these latents as not fired for longer than the dead window, so AuxK runs on them."""
        self.trainer.n_forward_passes_since_fired[index] = 10**13

    def step(self, x: torch.Tensor) -> torch.Tensor:
        trainer = self.trainer
        trainer.maybe_reset_sparsity()
        out = trainer.step(x)
        trainer.n_training_steps += 1
        return out.losses["mse_loss"].detach()

    def finish(self) -> None:
        """The inference SAE, as SAELens ends a run: final metadata, save_inference_model, load_from_disk."""
        from sae_lens import SAE

        self.trainer.set_final_sae_metadata()
        with tempfile.TemporaryDirectory() as tmp:
            self.sae.save_inference_model(tmp)
            self.inference_sae = SAE.load_from_disk(tmp, device=self.device).eval()

    @torch.no_grad()
    def encode_decode(self, x: torch.Tensor):
        """(reconstruction, latent indices, values) of the inference SAE (call ``finish`` first)."""
        sae = self.inference_sae
        acts = sae.encode(x.to(self.device))  # dense, at most k nonzero per row
        values, indices = acts.topk(self.k, dim=-1)
        return sae.decode(acts), indices, values


class SAELensMatryoshkaRun(SAELensRun):
    """SAELens's ``MatryoshkaBatchTopKTrainingSAE`` (its defaults: BatchTopK threshold learning rate
    0.01, the plain TopK AuxK) through the same trainer; SAELens saves it as a JumpReLU SAE."""

    def __init__(self, *args, widths, **kwargs):
        self.widths = list(widths)
        super().__init__(*args, **kwargs)

    def make_sae(self, d_in, d_sae, k, device):
        from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=self.widths, device=device))

    @torch.no_grad()
    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The inference (JumpReLU) SAE's dense code of x (call ``finish`` first)."""
        return self.inference_sae.encode(x.to(self.device))
