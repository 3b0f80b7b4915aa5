"""SAETrainer: learning, exact resume, data parallel, dead latents, decoder geometry,
normalisation folding and the errors a user meets."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastsae import SAEConfig, create_sae, ops
from fastsae.config import ACTIVATIONS
from fastsae.io import load_sae
from fastsae.normalize import fold_normalization, geometric_median
from fastsae.trainer import SAETrainer, train_sae_from_activations

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_dictionary_data(n=8192, d_in=32, n_features=64, p_active=0.04, seed=0, offset=2.0, scale=7.0):
    """x = sum of a few unit ground-truth features with positive magnitudes, plus an offset,
    times a scale far from 1 (so normalisation matters)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d_in, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=gen) < p_active
    mags = 0.5 + torch.rand(n, n_features, generator=gen)
    x = (active * mags) @ features + offset * torch.randn(d_in, generator=gen)
    return scale * x, features


def small_config(**kw):
    base = dict(d_in=32, d_sae=128, activation="topk", k=4, batch_size=256, num_epochs=1, learning_rate=3e-3,
                warmup_steps=5, eval_every=10**9, save_every=10**9, dtype="float32")
    base.update(kw)
    return SAEConfig(**base)


def make_trainer(x, cfg, save_dir=None, val=None, **kw):
    return SAETrainer(create_sae(cfg), cfg, x, val, device="cpu", save_dir=save_dir, **kw)


def losses(history):
    return {r["step"]: r["total_loss"] for r in history if "total_loss" in r}


# ----------------------------------------------------------------------------- learning

def test_learns_synthetic_dictionary_to_low_fvu(tmp_path):
    x, features = sparse_dictionary_data(n=16384)
    cfg = small_config(num_epochs=4, k=8, learning_rate=1e-2)
    sae, trainer = train_sae_from_activations(x, cfg, val_split=0.1, device="cpu", save_dir=tmp_path, verbose=False)
    # Measured 0.068 at these settings (a plain PyTorch TopK SAE plateaus at ~0.07 on these
    # data too); b_dec alone gives ~1.
    assert trainer.best_val_fvu < 0.09
    # Most ground-truth features have a decoder row pointing their way.
    cos = (features @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).t()).max(1).values
    print("recovered", (cos > 0.9).float().mean().item())
    for name in ("config.json", "metrics.jsonl", "loss_curves.png", "best_model", "final_model"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "config.json").read_text())["d_in"] == 32
    assert any("val_fvu" in json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines())
    # The returned SAE and the saved best model both take raw activations.
    best = load_sae(tmp_path / "best_model")
    for model in (sae, best):
        with torch.no_grad():
            recon = model.loss(x[:2048])["reconstruction"]
        assert ops.reference.fvu(recon, x[:2048]).item() < 0.1


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_resume_continues_exactly(tmp_path, activation):
    x, _ = sparse_dictionary_data(n=4096)
    # Two epochs (so the resumed run crosses an epoch boundary) and, for ReLU, a resample
    # after the resume point, which draws from the saved RNG state.
    cfg = small_config(activation=activation, num_epochs=2, l1_coefficient=3e-3, resample_interval=20,
                       dead_tokens_threshold=512, save_every=5)
    full = make_trainer(x, cfg, tmp_path / "full", log_every=1)
    full.train(verbose=False)

    part = make_trainer(x, cfg, tmp_path / "part", log_every=1)
    part.train(verbose=False, max_steps=12)
    assert (tmp_path / "part" / "checkpoints" / "step_12").is_dir()
    resumed = make_trainer(x, cfg, tmp_path / "part", log_every=1)
    resumed.train(verbose=False, resume=True)

    expected, got = losses(full.history), losses(resumed.history)
    assert resumed.history[0]["step"] == 13
    assert got[13] == expected[13]  # the very next step: identical
    assert all(got[s] == expected[s] for s in got)
    for a, b in zip(full.sae.parameters(), resumed.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # metrics.jsonl holds each step once.
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_load_checkpoint_and_keep_last_few(tmp_path):
    x, _ = sparse_dictionary_data(n=2048)
    cfg = small_config(num_epochs=2, save_every=2)
    trainer = make_trainer(x, cfg, tmp_path, keep_checkpoints=2)
    trainer.train(verbose=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_14", "step_16"]
    ckpt = tmp_path / "checkpoints" / "step_14"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 14 and state["epoch"] == 1 and state["position_in_epoch"] == 6
    assert isinstance(state["rng"]["resample"], list) and state["normalization_scale"] == trainer.scale
    other = make_trainer(x, cfg)
    other.load_checkpoint(tmp_path)  # a save_dir means its latest checkpoint
    assert other.step == 16 and other.scale == trainer.scale
    assert len(other.optimizer.state) == len(list(other.sae.parameters()))


# ----------------------------------------------------------------------------- data parallel

def _ddp_worker(rank, world_size, init_file, out_file, cfg_dict, steps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, _ = sparse_dictionary_data(n=2048)
        cfg = SAEConfig.from_dict(cfg_dict)
        trainer = make_trainer(x, cfg, log_every=1)
        assert trainer.local_batch == cfg.batch_size // world_size
        trainer.train(verbose=False, max_steps=steps)
        if rank == 0:
            torch.save({"params": trainer.sae.state_dict(), "losses": losses(trainer.history),
                        "dead": trainer.tokens_since_fired}, out_file)
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort its peer)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    # No latent goes dead in 6 steps, so the AuxK term (normalised per batch, hence per rank:
    # not exactly additive across ranks) is zero and the two runs must agree to rounding.
    cfg = small_config(num_epochs=20, batch_size=128)
    steps = 6
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt"), cfg.to_dict(), steps),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "out.pt", weights_only=True)

    x, _ = sparse_dictionary_data(n=2048)
    single = make_trainer(x, cfg, log_every=1)
    single.train(verbose=False, max_steps=steps)
    for name, p in single.sae.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(ddp["dead"], single.tokens_since_fired)
    # Logged losses are rank 0's half batch, so only close to the global-batch loss.
    assert abs(ddp["losses"][steps] - losses(single.history)[steps]) < 0.2 * losses(single.history)[steps]


# ----------------------------------------------------------------------------- dead latents

def _plant_dead(trainer, latent, how):
    with torch.no_grad():
        if how == "tiny_encoder":  # fires weakly on some inputs but never makes the top k
            trainer.sae.enc_weight[latent] *= 1e-3
            trainer.sae.b_enc[latent] *= 1e-3
        else:  # never fires at all
            trainer.sae.b_enc[latent] = -1e3


def _fires(trainer, x, latent):
    with torch.no_grad():
        code = trainer.sae.loss(x)["code"]
    values, indices = code.flat()
    return int(((indices == latent) & (values > 0)).sum())


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
def test_topk_kinds_start_with_each_latent_at_the_firing_rate_topk_allows(activation):
    from fastsae.trainer import ENCODER_BIAS_BALANCE

    x, _ = sparse_dictionary_data(n=8192)
    trainer = make_trainer(x, small_config(activation=activation, l1_coefficient=1e-3))
    trainer._initialise()
    sae = trainer.sae
    if activation == "relu":  # no k to balance against: b_enc stays zero
        assert torch.equal(sae.b_enc, torch.zeros_like(sae.b_enc))
        return
    pre = (x * trainer.scale - sae.b_dec) @ sae.enc_weight.t()  # the sample is all 8192 rows here
    quantile = pre.sort(dim=0).values[math.ceil((1 - 4 / 128) * 8192) - 1]  # k 4 of d_sae 128
    torch.testing.assert_close(sae.b_enc, -ENCODER_BIAS_BALANCE * quantile, rtol=1e-5, atol=1e-5)
    # With the whole quantile each latent would be positive on k / d_sae of the rows; with half
    # of it every latent is positive on more than that, the widest spread of directions too.
    positive = (pre + sae.b_enc > 0).float().mean(0)
    assert float(positive.min()) > 4 / 128


@pytest.mark.parametrize("aux", [True, False])
def test_auxk_revives_a_dead_topk_latent(aux):
    x, _ = sparse_dictionary_data(n=8192)
    cfg = small_config(num_epochs=3, aux_k_coefficient=1 / 32 if aux else 0.0, dead_tokens_threshold=1024)
    trainer = make_trainer(x, cfg)
    trainer._initialise()
    planted = torch.arange(0, 128, 4)  # a quarter of the latents
    _plant_dead(trainer, planted, "tiny_encoder")
    trainer.train(verbose=False)
    revived = sum(_fires(trainer, x[:4096], int(j)) > 0 for j in planted)
    if aux:
        assert revived >= 0.75 * len(planted)
    else:  # the control: without AuxK they stay dead
        assert revived <= 0.25 * len(planted)


def test_resampling_revives_a_dead_relu_latent():
    x, _ = sparse_dictionary_data(n=8192)
    cfg = small_config(activation="relu", num_epochs=1, l1_coefficient=1e-3, resample_interval=10,
                       dead_tokens_threshold=512)
    trainer = make_trainer(x, cfg)
    trainer._initialise()
    _plant_dead(trainer, 7, "never_fires")
    trainer.train(verbose=False, max_steps=9)
    assert _fires(trainer, trainer.batch_at(0), 7) == 0 and bool(trainer.dead_mask()[7])
    trainer.train(verbose=False)
    assert _fires(trainer, trainer.batch_at(0), 7) > 0


@pytest.mark.parametrize("optimizer", ["adam", "schedule_free_adam"])
def test_resample_geometry_and_adam_reset(optimizer):
    x, _ = sparse_dictionary_data(n=4096)
    cfg = small_config(activation="relu", resample_interval=10**9, dead_tokens_threshold=256, optimizer=optimizer)
    trainer = make_trainer(x, cfg)
    trainer._initialise()
    trainer.train(verbose=False, max_steps=3)
    trainer.tokens_since_fired[[3, 9]] = 10**6
    alive_norm = trainer.sae.enc_weight[~trainer.dead_mask()].norm(dim=1).mean()
    assert trainer.resample_dead_latents() == 2
    norms = trainer.sae.enc_weight[[3, 9]].norm(dim=1)
    torch.testing.assert_close(norms, torch.full((2,), 0.2 * alive_norm.item()))
    torch.testing.assert_close(trainer.sae.W_dec[[3, 9]].norm(dim=1), torch.ones(2))
    state = trainer.optimizer.state[trainer.sae.W_dec]
    assert state["exp_avg_sq"][[3, 9]].abs().sum() == 0 and state["exp_avg_sq"][4].abs().sum() > 0
    if optimizer == "adam":
        assert state["exp_avg"][[3, 9]].abs().sum() == 0
    else:  # the schedule-free average restarts at the new rows
        assert torch.equal(state["z"][[3, 9]], trainer.sae.W_dec.detach()[[3, 9]])


def test_dead_threshold_is_capped_for_short_runs():
    x, _ = sparse_dictionary_data(n=2048)
    trainer = make_trainer(x, small_config(num_epochs=4))  # 32 steps x 256 tokens
    assert trainer.dead_tokens_threshold == int(0.05 * 32 * 256)  # an SAE: 5% of the run
    assert make_trainer(x, small_config(num_epochs=1)).dead_tokens_threshold == 256  # at least a batch
    transcoder = small_config(num_epochs=4, architecture="transcoder", d_out=32, hook_point="blocks.0.hook_mlp_in",
                              output_hook_point="blocks.0.hook_mlp_out")
    assert make_trainer(torch.cat([x, x], 1), transcoder).dead_tokens_threshold == int(0.1 * 32 * 256)


# ----------------------------------------------------------------------------- decoder geometry

def test_decoder_gradient_projection_keeps_unit_rows():
    x, _ = sparse_dictionary_data(n=2048)
    cfg = small_config(grad_clip=0.0)
    trainer = make_trainer(x, cfg)
    trainer._initialise()
    sae = trainer.sae
    xb = trainer.batch_at(0)
    sae.loss(xb)["total_loss"].backward()
    raw = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    removed = raw - sae.W_dec.grad
    w = sae.W_dec.detach()
    # What was removed is along each row; what is left is orthogonal to it.
    torch.testing.assert_close(removed, (raw * w).sum(1, keepdim=True) * w, rtol=1e-5, atol=1e-7)
    assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-6
    sae.zero_grad()
    for step in range(3):
        trainer.train_step(trainer.batch_at(step))
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.d_sae))


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("nan")])  # within the clip, over it, not a number
def test_gradient_clipping_equals_torchs(scale, monkeypatch):
    """Bit for bit torch's clip_grad_norm_; within the clip the gradients are not scaled at
    all (no pass over them), over it (or at a norm that is not a number) torch's own scaling
    call scales them."""
    from fastsae import trainer as trainer_module

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(40, 7), (7,), (3, 40)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, mine):
        q.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch_calls = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda *a, **kw: torch_calls.append(1) or real(*a, **kw))
    trainer_module._clip_grad_norm(mine, 1.0)
    for p, q in zip(params, mine):
        assert torch.equal(p.grad, q.grad) or (math.isnan(scale) and bool(q.grad.isnan().all()))
    assert torch_calls == ([] if scale < 1 else [1])


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_folded_sae_on_raw_input_equals_scaled_reconstruction(activation):
    x, _ = sparse_dictionary_data(n=1024)
    trainer = make_trainer(x, small_config(activation=activation))
    trainer.train(verbose=False, max_steps=4)  # train() returns with the scale folded in
    s = trainer.scale
    assert abs(s - 1.0) > 0.5  # the data are far from unit scale
    raw = x[:64]
    folded = trainer.raw_sae()
    unfolded = trainer.raw_sae()
    fold_normalization(unfolded, 1 / s)  # back to the training parametrisation
    with torch.no_grad():
        got = folded.loss(raw)["reconstruction"]
        want = unfolded.loss(raw * s)["reconstruction"] / s
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * raw.abs().max().item())
        torch.testing.assert_close(folded.encode(raw), unfolded.encode(raw * s), rtol=1e-4, atol=1e-5)


def test_scale_and_geometric_median():
    x, _ = sparse_dictionary_data(n=4096)
    trainer = make_trainer(x, small_config())
    trainer._initialise()
    assert abs((x * trainer.scale).pow(2).sum(1).mean().item() / 32 - 1) < 0.05
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    med = geometric_median(pts, iters=500)
    assert med.norm() < 1.0  # the mean (25.25, 25.25) is dragged off by the outlier; the median is not


# ----------------------------------------------------------------------------- errors

def test_nan_mid_run_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    x, _ = sparse_dictionary_data(n=4096)
    cfg = small_config(save_every=5)
    probe = make_trainer(x, cfg)
    bad_row = int(probe.data._permutation(0, cfg.seed)[7 * 256 + 3])  # in the batch of step 8
    x[bad_row, 5] = float("nan")
    trainer = make_trainer(x, cfg, tmp_path, log_every=100)
    with pytest.raises(FloatingPointError, match=r"step 8 .*activations contain NaN.*step_5"):
        trainer.train(verbose=False)
    assert not (tmp_path / "checkpoints" / "step_10").exists()
    restored = make_trainer(x, cfg)
    restored.load_checkpoint(tmp_path / "checkpoints" / "step_5")
    assert restored.step == 5
    assert all(torch.isfinite(p).all() for p in restored.sae.parameters())


def test_wrong_width_is_a_clear_error():
    cfg = small_config()
    with pytest.raises(ValueError, match=r"activations have width 16 but config.d_in is 32"):
        make_trainer(torch.randn(512, 16), cfg)
    with pytest.raises(ValueError, match=r"val_activations have width 8"):
        make_trainer(torch.randn(512, 32), cfg, val=torch.randn(64, 8))


def test_unwritable_save_dir_fails_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"save_dir .*a_file/out.* is not a writable directory"):
        make_trainer(torch.randn(512, 32), small_config(), save_dir=blocker / "out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OSError, match="not a writable directory"):
            make_trainer(torch.randn(512, 32), small_config(), save_dir=locked)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when CUDA is absent")
def test_cuda_request_falls_back_to_cpu_with_a_warning():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        trainer = SAETrainer(create_sae(small_config()), small_config(), torch.randn(512, 32), device="cuda")
    assert trainer.device.type == "cpu"


def test_lr_schedule_warms_up_and_decays():
    config = small_config(num_epochs=10, warmup_steps=5, optimizer="adam")
    trainer = make_trainer(torch.randn(2560, 32), config)  # 100 steps
    lrs = [trainer.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[10] == pytest.approx(3e-3)
    assert lrs[99] == pytest.approx(3e-3 / 20) and all(b <= a for a, b in zip(lrs[80:], lrs[81:]))
    assert not math.isnan(sum(lrs))
    # schedule-free Adam: the same warmup, then constant (the average replaces the decay)
    free = make_trainer(torch.randn(2560, 32), small_config(num_epochs=10, warmup_steps=5))
    assert [free.lr_at(s) for s in range(100)] == lrs[:80] + [3e-3] * 20


def test_auto_learning_rate_follows_width_batch_and_length():
    from fastsae.trainer import AUTO_LR, auto_learning_rate

    base = AUTO_LR["schedule_free_adam"]
    assert auto_learning_rate("schedule_free_adam", 2**14, 4096, 100) == base
    assert auto_learning_rate("schedule_free_adam", 2**18, 4096, 100) == pytest.approx(base / 2)  # (1/16)^(1/4)
    assert auto_learning_rate("schedule_free_adam", 2**14, 1024, 50) == pytest.approx(base / 2)
    assert auto_learning_rate("schedule_free_adam", 2**14, 4096, 400) == pytest.approx(base / 2)  # sqrt(100/400)
    # The run's length counts rows: 1600 steps of 1024 rows are 400 steps of 4096.
    assert auto_learning_rate("schedule_free_adam", 2**14, 1024, 1600) == pytest.approx(base / 4)
    assert auto_learning_rate("schedule_free_adam", 2**14, 1024, 400) == pytest.approx(base / 2)
    assert auto_learning_rate("adam", 2**16, 4096, 10**5) == pytest.approx(1e-4)  # Gao et al.: 2e-4 / sqrt(4)
    assert auto_learning_rate("schedule_free_adam", 2**14, 4096, 400, transcoder=True) == pytest.approx(base)
    assert auto_learning_rate("adam", 2**16, 4096, 10**5, transcoder=True) == pytest.approx(1e-4)
    tc = SAEConfig(d_in=32, expansion_factor=4, k=4, batch_size=200, num_epochs=1, architecture="transcoder",
                   output_hook_point="blocks.0.hook_mlp_out")
    tc_trainer = SAETrainer(create_sae(tc), tc, torch.randn(200, 64), device="cpu")
    assert tc_trainer.learning_rate == pytest.approx(2 * auto_learning_rate("schedule_free_adam", 128, 200, 1))
    config = SAEConfig(d_in=32, expansion_factor=4, k=4, batch_size=256, num_epochs=1)
    trainer = SAETrainer(create_sae(config), config, torch.randn(200, 32), device="cpu")
    assert trainer.global_batch == 200  # capped by the data: the rule sees the batch actually used
    assert trainer.learning_rate == pytest.approx(auto_learning_rate("schedule_free_adam", 128, 200, 1))
    short = trainer.learning_rate
    trainer.train(num_epochs=4000, verbose=False, max_steps=1)  # a longer run (195 x 4096 rows): a smaller rate
    assert trainer.learning_rate == pytest.approx(auto_learning_rate("schedule_free_adam", 128, 200, 4000))
    assert trainer.learning_rate == pytest.approx(short * (100 / (4000 * 200 / 4096)) ** 0.5)
    explicit = SAEConfig(d_in=32, expansion_factor=4, k=4, learning_rate=3e-4)
    assert SAETrainer(create_sae(explicit), explicit, torch.randn(200, 32), device="cpu").learning_rate == 3e-4


# ----------------------------------------------------------------------------- activation store

@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "stubs"))
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import ByteTokenizer

    from fastsae.corpus import Corpus
    from fastsae.store import collect_to_store

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=16)).eval()
    docs = Corpus("numbers", lambda: [f"document number {i} " * (1 + i % 5) for i in range(400)], "numbers-400")
    return collect_to_store(model, ByteTokenizer(), docs, "blocks.1.hook_resid_post", tmp_path_factory.mktemp("s"),
                            6144, shard_tokens=2048, context_length=64, progress=False)


def test_trains_from_a_store_and_resumes_exactly(tiny_store, tmp_path):
    cfg = small_config(d_in=16, d_sae=64, num_epochs=2, save_every=4)
    full = make_trainer(tiny_store, cfg, tmp_path / "full", log_every=1)
    full.train(verbose=False)
    assert full.steps_per_epoch == 6144 // 256
    part = make_trainer(tiny_store, cfg, tmp_path / "part", log_every=1)
    part.train(verbose=False, max_steps=30)  # mid second epoch
    resumed = make_trainer(tiny_store, cfg, tmp_path / "part", log_every=1)
    resumed.train(verbose=False, resume=True)
    expected, got = losses(full.history), losses(resumed.history)
    assert min(got) == 31 and all(got[s] == expected[s] for s in got)
    assert expected[48] < 0.6 * expected[1]  # it learned (from a balanced start: see ENCODER_BIAS_BALANCE)


def test_float16_training_is_refused_with_the_reason():
    config = small_config(dtype="float16")
    with pytest.raises(ValueError, match=r"config.dtype='float16' cannot train: float16 needs loss scaling"):
        SAETrainer(create_sae(config), config, torch.randn(64, config.d_in), device="cpu")


def test_checkpoint_without_a_dead_count_resumes_with_auxk_sized_by_the_dead_latents(tmp_path):
    """Checkpoints that recorded only "aux_on" still resume with AuxK on, sized by the count."""
    cfg = small_config()
    x = torch.randn(1024, cfg.d_in, generator=torch.Generator().manual_seed(0))
    trainer = make_trainer(x, cfg, save_dir=tmp_path)
    trainer.train(verbose=False, max_steps=2)
    trainer.tokens_since_fired[:7] = 10**12  # at least seven dead latents
    trainer._save_checkpoint()
    state_path = trainer.last_checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["num_dead"]
    state["aux_on"] = True
    state_path.write_text(json.dumps(state))
    resumed = make_trainer(x, cfg, save_dir=tmp_path)
    resumed.load_checkpoint(trainer.last_checkpoint)
    assert resumed._num_dead == int(resumed.dead_mask().sum()) >= 7
    state["aux_on"] = False
    state_path.write_text(json.dumps(state))
    resumed.load_checkpoint(trainer.last_checkpoint)
    assert resumed._num_dead == 0


def test_schedule_free_saves_the_libraries_average():
    """The SAE the trainer evaluates and saves is what schedulefree's own eval() would swap in,
    and computing it leaves the training iterate untouched."""
    from fastsae.schedule_free import BlockedAdamWScheduleFree

    x = torch.randn(2048, 32)
    config = small_config(num_epochs=2)
    trainer = make_trainer(x, config)
    # The library's step run block by block (tests/test_schedule_free.py: the same bits).
    assert isinstance(trainer.optimizer, BlockedAdamWScheduleFree)
    trainer._initialise()
    with ops.input_checks(False):
        for step in range(5):
            trainer.train_step(trainer.batch_at(step))
    iterate = [p.detach().clone() for p in trainer.sae.parameters()]
    averaged = [p.detach().clone() for p in trainer._model_for_eval().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(iterate, trainer.sae.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(iterate, averaged))  # the average is not the iterate
    trainer.optimizer.eval()  # the library swaps its average into the parameters
    for mine, library in zip(averaged, trainer.sae.parameters()):
        torch.testing.assert_close(mine, library.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_saves_a_threshold_calibrated_to_k_latents_per_token(tmp_path, activation):
    # A short run: the EMA of batch minima alone would leave the inference L0 far from k.
    data, _ = sparse_dictionary_data(n=6144)
    x, held_out = data[:4096], data[4096:]
    trainer = make_trainer(x, small_config(activation=activation, k=8, num_epochs=2), save_dir=tmp_path)
    trainer.train(verbose=False)
    sample = trainer._sample_rows(8192, seed_offset=1)  # the calibration rows
    for sae in (trainer.sae.eval(), load_sae(tmp_path / "final_model")):
        l0 = sae.encode_sparse(sample).l0().mean()
        assert 7.9 <= float(l0) <= 8.1, float(l0)  # k on average (ties aside), over the rows it was set on
    assert 6 <= float(trainer.sae.encode_sparse(held_out).l0().mean()) <= 10  # and close on new rows
