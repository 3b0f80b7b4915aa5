"""Transcoders and skip transcoders: the config, every encoder kind's loss and gradients on
every backend against fastsae.reference (d_in != d_out), normalisation folding, training,
paired stores and streams, files, and SAELens loading our export."""
import json
import math

import pytest
import torch
from test_ops import assert_close_all

from fastsae import ops
from fastsae import reference as R
from fastsae.config import ACTIVATIONS, SAEConfig
from fastsae.io import load_sae, save_sae
from fastsae.models import create_sae
from fastsae.normalize import fold_normalization
from fastsae.trainer import SAETrainer

D_IN, D_OUT, D_SAE = 13, 7, 37  # none a multiple of a block size
IN, OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"


def _config(activation="topk", architecture="transcoder", **kw):
    kw = {"k": 5, "d_sae": D_SAE, "d_out": D_OUT, "hook_point": IN, "output_hook_point": OUT, "dtype": "float32",
          **kw}
    if architecture == "sae":
        kw.pop("d_out"), kw.pop("output_hook_point")
    return SAEConfig(d_in=D_IN, activation=activation, architecture=architecture, **kw)


def _transcoder(activation="topk", architecture="transcoder", seed=0, **kw):
    sae = create_sae(_config(activation, architecture, **kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if activation == "jumprelu":
            sae.log_threshold.fill_(math.log(0.05))
        if activation in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.2)
    return sae


def _rows(n=29, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen), torch.randn(n, D_OUT, generator=gen)


# ---------------------------------------------------------------- config

def test_config_defaults_and_errors():
    plain = SAEConfig(d_in=8)
    assert (plain.architecture, plain.output_hook_point, plain.d_out) == ("sae", None, 8)
    tc = SAEConfig(d_in=8, architecture="transcoder", output_hook_point=OUT)
    assert tc.d_out == 8 and tc.is_transcoder and not plain.is_transcoder
    assert plain.normalize_decoder is True and tc.normalize_decoder is False  # None: by architecture
    assert SAEConfig(d_in=8, architecture="transcoder", output_hook_point=OUT, normalize_decoder=True).normalize_decoder
    assert SAEConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="architecture must be one of"):
        SAEConfig(d_in=8, architecture="crosscoder")
    with pytest.raises(ValueError, match="architecture 'transcoder' needs output_hook_point"):
        SAEConfig(d_in=8, architecture="transcoder")
    with pytest.raises(ValueError, match="output_hook_point is for transcoders"):
        SAEConfig(d_in=8, output_hook_point=OUT)
    with pytest.raises(ValueError, match="d_out must equal d_in=8 for architecture 'sae', got 5"):
        SAEConfig(d_in=8, d_out=5)
    with pytest.raises(ValueError, match="output_hook_point must differ from hook_point"):
        SAEConfig(d_in=8, architecture="transcoder", hook_point=OUT, output_hook_point=OUT)
    with pytest.raises(ValueError, match="output_hook_point must be a dotted module name"):
        SAEConfig(d_in=8, architecture="transcoder", output_hook_point="blocks/1")
    with pytest.raises(ValueError, match="d_out must be an integer >= 1, got 0"):
        SAEConfig(d_in=8, architecture="transcoder", output_hook_point=OUT, d_out=0)


def test_shapes_and_the_skip_starts_at_zero():
    sae = create_sae(_config(architecture="skip_transcoder"))
    assert sae.W_dec.shape == (D_SAE, D_OUT) and sae.b_dec.shape == (D_OUT,)
    assert sae.enc_weight.shape == (D_SAE, D_IN) and sae.W_skip.shape == (D_OUT, D_IN)
    assert not sae.W_skip.any() and sae.input_bias is None
    assert not hasattr(create_sae(_config()), "W_skip")
    sae_rows = create_sae(_config(architecture="sae"))
    assert sae_rows.input_bias is sae_rows.b_dec


# ---------------------------------------------------------------- loss and gradients on every backend

def _reference_output(sae, x):
    """Dense codes by fastsae.reference from the transcoder's weights, and its prediction."""
    W, b = sae.enc_weight, sae.b_enc
    act = sae.config.activation
    if act == "topk":
        values, indices = R.topk_encode(x, W, b, sae.config.k)
        codes = R.to_dense(values, indices, sae.d_sae)
    elif act == "relu":
        codes = R.relu_codes(x, W, b)
    elif act == "jumprelu":
        codes = R.jumprelu_codes(x, W, b, sae.log_threshold.exp())
    elif act == "gated":
        codes = R.gated_codes(x, W, b, sae.r_mag, sae.b_mag)[0]
    else:  # BatchTopK kinds, while training: the N*k largest of the batch
        codes = R.batch_topk_codes(x, W, b, sae.config.k)
    skip = sae.W_skip if sae.config.architecture == "skip_transcoder" else None
    return codes, R.transcode(codes, sae.W_dec, sae.b_dec, x, skip)


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_prediction_matches_the_reference(activation, architecture):
    sae = _transcoder(activation, architecture).train()
    x, y = _rows()
    out = sae.loss(x, target=y)
    codes, expected = _reference_output(sae, x)
    torch.testing.assert_close(out["reconstruction"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["code"].to_dense(), codes, rtol=1e-5, atol=1e-5)
    expected = expected.detach()
    assert float(out["mse_loss"].detach()) == pytest.approx(float(R.mse(expected, y)), rel=1e-5)
    assert float(out["fvu"]) == pytest.approx(float(R.fvu(expected, y)), rel=1e-5)
    # paired rows [input | target] are the same batch
    paired = sae.loss(torch.cat([x, y], 1))
    torch.testing.assert_close(paired["total_loss"], out["total_loss"])


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: interpreted on CPU
@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_and_gradients_match_the_reference_backend(backend, activation, architecture):
    x, y = _rows()
    results = {}
    for name in ("reference", backend):
        sae = _transcoder(activation, architecture).train()
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[::3] = True
        aux = {"dead_mask": dead, "max_aux_k": int(dead.sum())} if activation in ("topk", "batchtopk") else {}
        with ops.use_backend(name):
            out = sae.loss(x, target=y, **aux)
            out["total_loss"].backward()
        results[name] = (out["total_loss"].detach(), {n: p.grad for n, p in sae.named_parameters()})
    (ref_loss, ref_grads), (loss, got) = results["reference"], results[backend]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_all(list(got.values()), list(ref_grads.values()), rtol=1e-4, atol=1e-5)
    if architecture == "skip_transcoder":
        assert got["W_skip"].abs().sum() > 0  # W_skip learns


def test_split_rows_errors():
    sae = _transcoder()
    with pytest.raises(ValueError, match=r"\[input \| target\] of width d_in \+ d_out = 20"):
        sae.loss(torch.randn(4, D_IN))
    with pytest.raises(ValueError, match="target must have 4 rows of d_out=7"):
        sae.loss(torch.randn(4, D_IN), target=torch.randn(4, D_IN))


def test_seed_forward_predicts_the_target():
    sae = _transcoder(architecture="skip_transcoder").eval()
    x, y = _rows(6)
    recon, features, metrics = sae(x.reshape(2, 3, D_IN))
    assert recon.shape == (2, 3, D_OUT) and features.shape == (2, 3, D_SAE)
    torch.testing.assert_close(recon.reshape(6, D_OUT), _reference_output(sae, x)[1])
    _, _, metrics = sae(x, target=y)
    expected = float(R.mse(recon.reshape(6, D_OUT).detach(), y))
    assert float(metrics["mse_loss"].detach()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
def test_folding_two_scales(architecture):
    sae = _transcoder("relu", architecture).eval()
    x, _ = _rows()
    s, t = 3.0, 0.25
    with torch.no_grad():
        trained_codes = sae.encode(s * x)
        trained = sae(s * x)[0] / t
        fold_normalization(sae, s, t)
        torch.testing.assert_close(sae.encode(x), trained_codes)
        torch.testing.assert_close(sae(x)[0], trained, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training

def _linear_task(n=6000, seed=0):
    """y = a sparse ReLU dictionary's output plus a linear map of x: what a skip transcoder can fit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen) * 5.0
    enc, dec = torch.randn(24, D_IN, generator=gen), torch.randn(24, D_OUT, generator=gen)
    codes = torch.relu(x @ enc.t() - 30.0)  # about one feature of 24 active per row
    y = codes @ dec * 0.1 + x @ torch.randn(D_IN, D_OUT, generator=gen) * 0.3 + 2.0
    return torch.cat([x, y], 1)


def test_training_learns_the_map_and_saves_what_it_measured(tmp_path):
    rows = _linear_task()
    train, val = rows[:5000], rows[5000:]
    fvus = {}
    for architecture in ("transcoder", "skip_transcoder"):
        config = _config(architecture=architecture, d_sae=64, k=8, batch_size=250, num_epochs=8, eval_every=80,
                         save_every=10_000)
        run = tmp_path / architecture
        trainer = SAETrainer(create_sae(config), config, train, val, device="cpu", save_dir=run)
        trainer.train(verbose=False)
        assert trainer.output_scale != trainer.scale  # two scales: x ~ 5 N(0, 1), y elsewhere
        fvus[architecture] = fvu = trainer.evaluate()
        # The saved model takes raw rows: its FVU on the raw validation rows is the trainer's.
        loaded = load_sae(run / "final_model")
        assert loaded.config.output_hook_point == OUT and loaded.d_out == D_OUT
        with torch.no_grad():
            assert float(R.fvu(loaded(val[:, :D_IN])[0], val[:, D_IN:])) == pytest.approx(fvu, rel=1e-4)
        meta = json.loads((run / "final_model" / "cfg.json").read_text())["fastsae"]["metadata"]
        assert meta["output_normalization_scale"] == pytest.approx(trainer.output_scale)
    # measured 0.148 and 0.061: the skip term takes the linear part the dictionary must approximate
    assert fvus["transcoder"] < 0.25 and fvus["skip_transcoder"] < 0.6 * fvus["transcoder"], fvus


def test_trainer_refuses_unpaired_rows():
    config = _config()
    with pytest.raises(ValueError, match=r"a transcoder trains on \[input \| target\] rows of d_in \+ d_out = "
                                         r"13 \+ 7.*PairedStore"):
        SAETrainer(create_sae(config), config, torch.randn(100, D_IN), device="cpu")


# ---------------------------------------------------------------- files and SAELens

@pytest.mark.parametrize("activation,architecture,saelens_name", [
    ("relu", "transcoder", "transcoder"),
    ("relu", "skip_transcoder", "skip_transcoder"),
    ("jumprelu", "transcoder", "jumprelu_transcoder"),
    ("jumprelu", "skip_transcoder", "jumprelu_skip_transcoder"),
    ("batchtopk", "skip_transcoder", "jumprelu_skip_transcoder"),
])
def test_files_round_trip_and_sae_lens_encodes_identically(tmp_path, activation, architecture, saelens_name):
    sae = _transcoder(activation, architecture).eval()
    path = save_sae(sae, sae.config, tmp_path / "tc")
    cfg = json.loads((path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (saelens_name, D_OUT, False)
    assert cfg["metadata"]["hook_name_out"] == OUT
    loaded = load_sae(path)
    assert loaded.config == sae.config
    x, _ = _rows()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], sae(x)[0])
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    assert type(theirs).__name__.lower().replace("_", "") == saelens_name.replace("_", "")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs(x), sae(x)[0], rtol=1e-5, atol=1e-5)
    # ... and a plain SAELens file (no fastsae part) reads back as the same transcoder
    del cfg["fastsae"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    plain = load_sae(path)
    assert (plain.config.architecture, plain.config.output_hook_point, plain.d_out) == (architecture, OUT, D_OUT)
    if activation != "batchtopk":  # (read back as JumpReLU, the form SAELens has)
        with torch.no_grad():
            torch.testing.assert_close(plain(x)[0], sae(x)[0])


def test_topk_transcoders_keep_their_own_name(tmp_path):
    sae = _transcoder("topk", "skip_transcoder").eval()
    path = save_sae(sae, sae.config, tmp_path / "tc")
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    x, _ = _rows()
    with torch.no_grad():
        assert torch.equal(load_sae(path)(x)[0], sae(x)[0])


def test_a_plain_saelens_transcoder_without_an_output_hook(tmp_path):
    sae = _transcoder("relu").eval()
    path = save_sae(sae, sae.config, tmp_path / "tc")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["fastsae"], cfg["metadata"]["hook_name_out"], cfg["hook_name_out"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(path).config.output_hook_point == OUT  # mlp_in -> mlp_out, the usual pairing
    cfg["hook_name"] = cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="a transcoder file needs metadata.hook_name_out"):
        load_sae(path)


# ---------------------------------------------------------------- evaluation

def test_evaluator_measures_against_the_target():
    from fastsae.evaluator import SAEEvaluator

    sae = _transcoder("matryoshka_batchtopk", "skip_transcoder", matryoshka_sizes=(4, 16, D_SAE)).eval()
    x, y = _rows(300)
    metrics = SAEEvaluator(sae).evaluate(x, targets=y, batch_size=128)
    with torch.no_grad():
        prediction = sae(x)[0]
        prefixes = sae.prefix_reconstructions(sae.encode_sparse(x)) + sae.skip(x)[:, None]
    assert metrics.fvu == pytest.approx(float(R.fvu(prediction, y)), rel=1e-5)
    assert metrics.mse_loss == pytest.approx(float(R.mse(prediction, y)), rel=1e-5)
    assert metrics.prefix_fvu[4] == pytest.approx(float(R.fvu(prefixes[:, 0], y)), rel=1e-5)
    paired = SAEEvaluator(sae).evaluate(torch.cat([x, y], 1), batch_size=128)
    assert paired.fvu == pytest.approx(metrics.fvu, rel=1e-7)
    assert SAEEvaluator(sae).feature_activations(3, torch.cat([x, y], 1)).shape == (300,)
    with pytest.raises(ValueError, match=r"activations must have shape \[N, d_in=20\]"):
        SAEEvaluator(sae).evaluate(x)
    with pytest.raises(ValueError, match="targets must have one row per activation row"):
        SAEEvaluator(sae).evaluate(x, targets=y[:10])


def test_loss_recovered_splices_the_prediction_in_place_of_the_mlp(tiny):
    from fastsae.evaluator import _ce_sums, loss_recovered

    model, _ = tiny
    config = SAEConfig(d_in=16, d_sae=40, k=6, architecture="skip_transcoder", hook_point="blocks.1.hook_mlp_in",
                       output_hook_point="blocks.1.hook_mlp_out", dtype="float32")
    sae = create_sae(config).eval()
    with torch.no_grad():
        sae.W_skip.copy_(0.3 * torch.randn(16, 16))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    got = loss_recovered(model, sae, None, [ids])
    mask = torch.ones_like(ids)

    def loss_with_mlp(forward):
        mlp = model.transformer.h[1].mlp
        original = mlp.forward
        mlp.forward = forward
        try:
            with torch.no_grad():
                total, n = _ce_sums(model(ids), ids, mask)
        finally:
            mlp.forward = original
        return total / n

    with torch.no_grad():
        expected_sae = loss_with_mlp(lambda h: sae(h)[0])  # the MLP's input h -> the transcoder's output
    assert got["loss_sae"] == pytest.approx(expected_sae, rel=1e-6)
    assert got["loss_zero"] == pytest.approx(loss_with_mlp(torch.zeros_like), rel=1e-6)
    assert got["loss_clean"] == pytest.approx(_ce_sums(model(ids), ids, mask)[0] / 33, rel=1e-6)
    # a transcoder pointed backwards (the output before the input) is refused
    sae.config.hook_point, sae.config.output_hook_point = "blocks.1.hook_mlp_in", "blocks.0.hook_mlp_out"
    with pytest.raises(RuntimeError, match="ran before its input"):
        loss_recovered(model, sae, None, [ids])


# ---------------------------------------------------------------- paired stores and streams

def _docs():
    from nanochat_stub import number_docs

    return number_docs(200)


def test_paired_store_rows_are_one_token_each(tiny, tmp_path):
    from fastsae.store import PairedStore, StoreMismatchError, collect_to_stores, split_store

    model, tok = tiny
    stores = collect_to_stores(model, tok, _docs(), {IN: tmp_path / "in", OUT: tmp_path / "out"}, 1500,
                               shard_tokens=256, progress=False)
    paired = PairedStore(stores[IN], stores[OUT])
    assert (paired.d_in, len(paired), paired.output_hook_point) == (32, 1500, OUT)
    torch.testing.assert_close(paired.load_all(), torch.cat([stores[IN].load_all(), stores[OUT].load_all()], 1))
    # shuffled batches pair the same tokens: both halves are those tokens' rows
    first = paired.read_shard(0)
    by_token = {int(i): row for i, row in zip(first["token_index"], first["activations"])}
    batches = list(paired.iter_batches(100, shuffle=True, seed=3, epoch=1, with_metadata=True, buffer_tokens=512))
    assert sum(b[0].shape[0] for b in batches) == 1500
    rows, meta = batches[0]
    for row, token in zip(rows, meta["token_index"]):
        if int(token) in by_token:
            assert torch.equal(row, by_token[int(token)])
    train, val = split_store(paired, 0.2)
    assert val.shape[1] == 32 and len(train) + val.shape[0] == 1500
    # stores of different collections are refused
    other = collect_to_stores(model, tok, _docs(), {OUT: tmp_path / "short"}, 700, shard_tokens=256,
                              progress=False)[OUT]
    with pytest.raises(StoreMismatchError, match="hold different tokens"):
        PairedStore(stores[IN], other)
    wider = collect_to_stores(model, tok, _docs(), {OUT: tmp_path / "wide"}, 1500, shard_tokens=512,
                              progress=False)[OUT]
    with pytest.raises(StoreMismatchError, match="different collections .*shard_tokens"):
        PairedStore(stores[IN], wider)
    # a stream of the same pair serves the same rows (in corpus order), and a transcoder trains on it
    from fastsae.data import StreamSource
    from fastsae.evaluator import SAEEvaluator

    config = SAEConfig(d_in=16, d_sae=32, k=4, architecture="transcoder", hook_point=IN, output_hook_point=OUT,
                       dtype="float32", batch_size=100, num_epochs=3)
    stream = StreamSource(model, tok, _docs(), (IN, OUT), 1500, window_rows=500, batch_size=32, context_length=128)
    assert stream.width == 32
    torch.testing.assert_close(torch.cat(list(stream.chunks())), paired.load_all())
    untrained = SAEEvaluator(create_sae(config).eval()).evaluate(paired.load_all()).fvu
    trainer = SAETrainer(create_sae(config), config, stream, device="cpu")
    trainer.train(verbose=False)
    assert SAEEvaluator(trainer.sae.eval()).evaluate(paired.load_all()).fvu < 0.5 * untrained


# ---------------------------------------------------------------- the CLI, on the embedded MiniLM

SMALL = ["--num_activations", "4096", "--batch_size", "256", "--num_epochs", "2", "--expansion_factor", "2",
         "--k", "16", "--context_length", "64", "--device", "cpu", "--quiet"]


@pytest.mark.usefixtures("one_thread")
def test_cli_trains_evaluates_and_exports_skip_transcoders(tmp_path, capsys):
    from fastsae.cli import main

    out = tmp_path / "out"
    assert main(["train", "--layers", "0,1", "--architecture", "skip_transcoder", "--output_dir", str(out),
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "skip transcoder d_in=384 d_sae=768 on blocks.1.hook_mlp_in -> blocks.1.hook_mlp_out" in printed
    for layer in (0, 1):
        folder = out / f"layer_{layer}"
        assert (folder / "activations").is_dir() and (folder / "target_activations").is_dir()
        sae = load_sae(folder / "best_model")
        assert (sae.config.hook_point, sae.config.output_hook_point) == (f"blocks.{layer}.hook_mlp_in",
                                                                       f"blocks.{layer}.hook_mlp_out")
        assert sae.W_skip.abs().sum() > 0
    best = json.loads((out / "layer_1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert best["val_fvu"] < 0.5
    evaluated = tmp_path / "eval"
    assert main(["eval", "--sae_path", str(out / "layer_1" / "best_model"), "--num_tokens", "1024",
                 "--loss_batches", "2", "--output_dir", str(evaluated), "--generate_dashboards", "--neuronpedia",
                 "--max_features", "4", "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((evaluated / "layer_1" / "eval_metrics.json").read_text())
    assert metrics["fvu"] < 0.5 and 0 < metrics["loss_recovered"]["fraction_recovered"] <= 1.01
    assert metrics["loss_recovered"]["loss_sae"] < metrics["loss_recovered"]["loss_zero"]
    page = evaluated / "layer_1" / "dashboard" / "index.html"
    assert "blocks.1.hook_mlp_in \u2192 blocks.1.hook_mlp_out" in page.read_text()
    from test_dashboard_browser import CHROMIUM, dump_dom

    if CHROMIUM is not None:  # as a reader's browser shows it
        dom, log = dump_dom(page.as_uri(), tmp_path / "profile")
        assert "output hook point" in dom and "skip_transcoder" in dom and "Uncaught" not in log
    batch = json.loads((evaluated / "layer_1" / "neuronpedia" / "batch-0.json").read_text())
    assert batch["hook_point_out"] == "blocks.1.hook_mlp_out"
    exported = json.loads((evaluated / "layer_1" / "neuronpedia" / "metadata.json").read_text())
    assert exported["hook_point_out"] == "blocks.1.hook_mlp_out"


@pytest.mark.usefixtures("one_thread")
def test_cli_streams_a_transcoder_and_checks_its_flags(tmp_path, capsys):
    from fastsae.cli import main

    assert main(["train", "--layer", "2", "--architecture", "transcoder", "--activation", "relu", "--stream",
                 "--output_dir", str(tmp_path / "s"), *SMALL]) == 0
    sae = load_sae(tmp_path / "s" / "layer_2" / "best_model")
    assert sae.config.architecture == "transcoder" and sae.config.activation == "relu"
    assert not (tmp_path / "s" / "layer_2" / "activations").exists()
    capsys.readouterr()
    for flags, message in [
        (["--layer", "1", "--architecture", "transcoder", "--hook_type", "mlp", "--output_hook_type", "mlp_out"],
         "--output_hook_type must differ from --hook_type"),
        (["--layer", "1", "--architecture", "transcoder", "--activations", str(tmp_path)],
         "give --target_activations"),
        (["--layer", "1", "--target_activations", str(tmp_path)], "--target_activations is for a transcoder"),
        (["--hook_points", "encoder.layer.1.intermediate", "--architecture", "transcoder"],
         "a transcoder's input must be a block hook point"),
    ]:
        assert main(["train", *flags, "--output_dir", str(tmp_path / "bad"), *SMALL]) == 1
        assert message in capsys.readouterr().err
