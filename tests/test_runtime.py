"""InterpretableModel: tracking and steering on a nanochat-named stand-in and on Hugging Face GPT-2."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from runtime_stub import KVCache, TinyGPT  # noqa: E402

import fastsae  # noqa: E402
from fastsae.config import SAEConfig  # noqa: E402
from fastsae.models import create_sae  # noqa: E402
from fastsae.runtime import FeatureEdit, InterpretableModel, ablate, add, clamp, scale  # noqa: E402

HP = "blocks.1.hook_resid_post"
PRE = "blocks.2.hook_resid_pre"
ATTN = "blocks.0.hook_attn_out"
D, VOCAB = 32, 97


def make_sae(d_in=D, d_sae=256, k=8, seed=7):
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, seed=seed))
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return sae


@pytest.fixture
def model():
    return TinyGPT(VOCAB, D, n_layer=3, seed=0).eval()


@pytest.fixture
def im(model):
    return InterpretableModel(model, {HP: make_sae(), PRE: make_sae(seed=8), ATTN: make_sae(d_sae=128, k=4, seed=9)})


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def capture(module):
    """Record a module's output (registered last, so it sees any steering edit)."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    return seen, handle


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- construction

def test_builds_with_dotted_hook_points_and_is_the_seed_export(model):
    assert fastsae.InterpretableModel is InterpretableModel
    im = InterpretableModel(model, {HP: make_sae(), PRE: make_sae()})
    assert list(im.saes) == [HP, PRE]
    assert len(list(im._sae_modules.parameters())) == 8  # both SAEs reachable for .to()/state_dict
    assert im.device == torch.device("cpu")


def test_unknown_hook_point_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown hook point 'blocks.1.hook_resid_postt'"):
        InterpretableModel(model, {"blocks.1.hook_resid_postt": make_sae()})
    with pytest.raises(ValueError, match="layer 7 out of range"):
        InterpretableModel(model, {"blocks.7.hook_resid_post": make_sae()})


# ----------------------------------------------------------------------------- steering

def test_noop_steering_is_bit_identical(im, model, ids):
    plain = model(ids)
    with im.steering_enabled({HP: (5, 1.0), PRE: add(3, 0.0)}):
        assert torch.equal(model(ids), plain)


def test_ablating_a_silent_feature_computes_a_zero_delta(im, model, ids):
    """The edit path runs (ablate is never skipped) and f' - f is exactly 0 where f is 0."""
    with im.interpretation_enabled():
        model(ids)
    active = set(im.trace[HP].rows()["indices"].flatten().tolist())
    silent = next(i for i in range(256) if i not in active)
    plain = model(ids)
    with im.steering_enabled({HP: ablate(silent)}):
        assert torch.equal(model(ids), plain)


def _hand_edit(x, sae, feature, edit):
    """x + (f' - f) * W_dec[feature], with f from the SAE's sparse code."""
    code = sae.encode_sparse(x.reshape(-1, D))
    f = (code.values * (code.indices == feature)).sum(1).reshape(*x.shape[:-1], 1)
    new = {"ablate": 0 * f, "clamp": torch.full_like(f, edit.value), "scale": edit.value * f,
           "add": f + edit.value}[edit.mode]
    return x + (new - f) * sae.W_dec[feature]


@pytest.mark.parametrize("edit", [ablate(0), clamp(0, 3.0), scale(0, -2.0), add(0, 1.5)], ids=lambda e: e.mode)
def test_edit_at_the_hook_equals_the_hand_computation(im, model, ids, edit):
    sae = im.saes[HP]
    seen, handle = capture(model.transformer.h[1])
    with torch.no_grad():
        model(ids)
        x = seen.pop()
        feature = int(sae.encode_sparse(x.reshape(-1, D)).indices[0, 0])  # active at token 0
        edit = FeatureEdit(feature, edit.mode, edit.value)
        with im.steering_enabled({HP: edit}):
            steered_logits = model(ids)
        handle.remove()
        expected = _hand_edit(x, sae, feature, edit)
    torch.testing.assert_close(seen.pop(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(steered_logits, model(ids))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "gated", "batchtopk"])
def test_steering_an_sae_whose_latents_decide_alone_encodes_only_the_edited_ones(model, ids, activation,
                                                                                  monkeypatch):
    sae = create_sae(SAEConfig(d_in=D, d_sae=256, k=8, activation=activation, seed=7, jumprelu_init_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.add_(0.05)
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=torch.Generator().manual_seed(4)))
        if activation == "batchtopk":
            sae.threshold.fill_(0.05)
    im = InterpretableModel(model, {HP: sae})

    def refuse(*_a):
        raise AssertionError("the whole dictionary was encoded")
    monkeypatch.setattr(im, "_encode", refuse)
    seen, handle = capture(model.transformer.h[1])
    try:
        with torch.no_grad():
            model(ids)
            x = seen.pop()
            f = sae.encode_sparse(x.reshape(-1, D)).to_dense()
            active = int(f[0].argmax())
            edits = [scale(active, -2.0), clamp(3, 1.0), ablate(200)]
            with im.steering_enabled({HP: edits}):
                model(ids)
    finally:
        handle.remove()
    new = f.clone()
    new[:, active] *= -2.0
    new[:, 3], new[:, 200] = 1.0, 0.0
    expected = x + ((new - f) @ sae.W_dec).reshape(x.shape)
    assert float(f[:, active].abs().sum()) > 0
    torch.testing.assert_close(seen.pop(), expected, rtol=0, atol=1e-5)


def test_ablation_is_exactly_x_minus_f_times_decoder_row(im, model, ids):
    sae = im.saes[HP]
    seen, handle = capture(model.transformer.h[1])
    with torch.no_grad():
        model(ids)
        x = seen.pop()
        code = sae.encode_sparse(x.reshape(-1, D))
        i = int(code.indices[3, 0])
        f_i = (code.values * (code.indices == i)).sum(1).reshape(2, 9, 1)
        with im.steering_enabled({HP: ablate(i)}):
            model(ids)
    handle.remove()
    assert torch.equal(seen.pop(), x - f_i * sae.W_dec[i])


def test_seed_tuple_scales_and_the_sae_error_is_kept(im, model, ids):
    """(idx, strength) multiplies the feature; the activation is never replaced by the reconstruction."""
    sae = im.saes[HP]
    seen, handle = capture(model.transformer.h[1])
    with torch.no_grad():
        model(ids)
        x = seen.pop()
        i = int(sae.encode_sparse(x.reshape(-1, D)).indices[0, 0])
        with im.steering_enabled({HP: (i, 3.0)}):
            model(ids)
    handle.remove()
    torch.testing.assert_close(seen.pop(), _hand_edit(x, sae, i, scale(i, 3.0)), rtol=0, atol=1e-6)


def test_steering_a_pre_hook_point_edits_the_block_input(im, model, ids):
    seen = []
    handle = model.transformer.h[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    sae = im.saes[PRE]
    with torch.no_grad():
        model(ids)
        x = seen.pop()
        i = int(sae.encode_sparse(x.reshape(-1, D)).indices[0, 0])
        with im.steering_enabled({PRE: ablate(i)}):
            model(ids)
    handle.remove()
    torch.testing.assert_close(seen.pop(), _hand_edit(x, sae, i, ablate(i)), rtol=0, atol=1e-6)


def test_steer_generates_with_kv_cache_and_changes_the_continuation(im, model, ids):
    sae = im.saes[HP]
    plain = im.generate(ids, max_new_tokens=6, kv_cache=KVCache())
    assert plain.shape == (2, 15)
    assert torch.equal(plain, im.generate(ids, max_new_tokens=6))  # cache and full recompute agree
    same = im.steer(ids, (HP, 3), 1.0, max_new_tokens=6, kv_cache=KVCache())
    assert torch.equal(same, plain)
    feature = int(sae.W_dec.norm(dim=1).argmax())
    steered = im.steer(ids, (HP, feature), 40.0, mode="add", max_new_tokens=6, kv_cache=KVCache())
    assert steered.shape == plain.shape and not torch.equal(steered, plain)
    assert torch.equal(steered[:, :9], ids)


# ----------------------------------------------------------------------------- tracking

def _kv_generate(model, ids, prompt_len):
    """Prefill ids[:, :prompt_len], then feed the rest one token per call, as a decoder would."""
    cache = KVCache()
    model(ids[:, :prompt_len], kv_cache=cache)
    for t in range(prompt_len, ids.shape[1]):
        model(ids[:, t:t + 1], kv_cache=cache)


def _by_position(trace, hp):
    rows = trace[hp].rows()
    order = torch.argsort(rows["batch"] * 10_000 + rows["position"])
    return {k: v[order] for k, v in rows.items()}, trace[hp].dense()[order]


def test_tracking_with_kv_cache_equals_full_sequence_forward(im, model, ids):
    with im.interpretation_enabled():
        _kv_generate(model, ids, 4)
    cached = im.trace
    chunks = cached[HP]._chunks
    assert [c.tokens for c in chunks] == [4, 1, 1, 1, 1, 1]  # prefill, then (B, 1, D) decode steps
    with im.interpretation_enabled():
        model(ids)
    full = im.trace
    for hp in (HP, PRE, ATTN):
        rows_c, dense_c = _by_position(cached, hp)
        rows_f, dense_f = _by_position(full, hp)
        assert torch.equal(rows_c["position"], rows_f["position"])
        assert torch.equal(rows_c["batch"], rows_f["batch"])
        assert torch.equal(rows_c["position"], torch.arange(9).repeat(2))
        torch.testing.assert_close(dense_c, dense_f, rtol=1e-4, atol=1e-4)
    assert set(cached[HP].rows()["seq"].tolist()) == {0}


def test_decode_step_tracking_equals_the_saes_code_and_follows_weight_updates(model):
    # One-row activations take the transposed-encoder path: it must agree with encode_sparse,
    # and an in-place change of W_enc (training on after wrapping) must not leave it stale.
    sae = make_sae(d_sae=320, k=5)  # d_sae not a multiple of 64 or of the GEMM's blocks
    im = InterpretableModel(model, {HP: sae})
    seen, handle = capture(model.transformer.h[1])
    ids = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(3))
    try:
        for _ in range(2):  # as made, then after W_enc changes in place
            with im.interpretation_enabled():
                model(ids)
            rows = im.trace[HP].rows()
            code = sae.encode_sparse(seen.pop().reshape(-1, D))
            assert torch.equal(rows["indices"], code.indices)
            torch.testing.assert_close(rows["values"], code.values, rtol=1e-6, atol=1e-6)
            with torch.no_grad():
                sae.enc_weight.mul_(-1.5)  # a different top-k from here on
    finally:
        handle.remove()


def _track_on_a_kept_copy(model, sae, ids, copy_name):
    """Track ids three times (twice as made, then after W_enc changes in place), checking each
    trace against encode_sparse: (the hook's encoder, the rows the cut encoded per run), after
    asserting that the kept copy was made once and made again after the change."""
    from fastsae import torch_backend

    im = InterpretableModel(model, {HP: sae})
    encoder = im._topk_encoders[HP]
    seen, handle = capture(model.transformer.h[1])
    copies, cut_rows = [], []
    try:
        for step in range(3):
            torch_backend.reset_selection_counts()
            with im.interpretation_enabled():
                model(ids)
            cut_rows.append(torch_backend.SURVIVORS["rows"])
            copies.append(encoder._copies[copy_name][1])
            rows = im.trace[HP].rows()
            code = sae.encode_sparse(seen.pop().reshape(-1, D))
            assert torch.equal(rows["indices"], code.indices)
            torch.testing.assert_close(rows["values"], code.values, rtol=1e-5, atol=1e-5)
            if step == 1:
                with torch.no_grad():
                    sae.enc_weight.mul_(-1.5)
    finally:
        handle.remove()
    assert copies[0] is copies[1] and copies[2] is not copies[1]
    return encoder, cut_rows


def test_decode_step_on_a_kept_fp16_encoder_equals_the_saes_code(model, monkeypatch):
    # An encoder too big to stay cached (here: every encoder, by a zero cache) is read by a decode
    # step from a float16 copy the hook keeps, cut and rescored in fp32: the same code as
    # encode_sparse, the copy made once and again after W_enc changes in place, no fp32 copy.
    from fastsae import torch_backend

    monkeypatch.setattr(torch_backend, "CACHE_RESIDENT_BYTES", 0)
    ids = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(5))
    encoder, cut_rows = _track_on_a_kept_copy(model, make_sae(d_sae=1100, k=4), ids, "fp16")
    assert cut_rows == [2, 2, 2]  # the cut decided both rows every time
    assert "transposed" not in encoder._copies


def test_prefill_tracking_on_a_kept_bf16_encoder_equals_the_saes_code(model, monkeypatch):
    # A prefill-size call on a wide-enough dictionary runs the exact bf16 encode on a bf16 copy
    # of the encoder the hook keeps: the same code as encode_sparse, the copy made once and made
    # again after W_enc changes in place.
    from fastsae import selection

    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    sae = make_sae(d_sae=1100, k=4)  # 18 groups of 64 >= 2k; not a multiple of 64
    assert selection.usable(sae.d_sae, sae.config.k)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    _, cut_rows = _track_on_a_kept_copy(model, sae, ids, "bf16")
    assert all(n > 0 for n in cut_rows)  # the bf16 path ran


def test_an_edit_through_data_needs_refresh_copies(model, monkeypatch):
    # PyTorch's version counter does not see an edit through .data, so the kept float16 copy
    # outlives it until refresh_copies(); then the trace follows the edited encoder again.
    from fastsae import torch_backend

    monkeypatch.setattr(torch_backend, "CACHE_RESIDENT_BYTES", 0)
    sae = make_sae(d_sae=1100, k=4)
    im = InterpretableModel(model, {HP: sae})
    encoder = im._topk_encoders[HP]
    ids = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(5))
    seen, handle = capture(model.transformer.h[1])
    try:
        with im.interpretation_enabled():
            model(ids)
        before = encoder._copies["fp16"][1]
        sae.enc_weight.data.mul_(-1.5)  # a different top-k, unseen by the version counter
        with im.interpretation_enabled():
            model(ids)
        assert encoder._copies["fp16"][1] is before
        im.refresh_copies()
        with im.interpretation_enabled():
            model(ids)
        assert encoder._copies["fp16"][1] is not before
        code = sae.encode_sparse(seen.pop().reshape(-1, D))
        assert torch.equal(im.trace[HP].rows()["indices"], code.indices)
    finally:
        handle.remove()


def test_prefill_tracking_on_a_narrow_dictionary_keeps_no_bf16_copy(model, monkeypatch):
    # Fewer than 2k groups of latents leave the cut nothing to decide: the fp32 GEMM and top-k,
    # with no bf16 copy made.
    from fastsae import selection, torch_backend

    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    sae = make_sae(d_sae=448, k=4)  # 7 groups of 64 < 2k
    assert not selection.usable(sae.d_sae, sae.config.k)
    im = InterpretableModel(model, {HP: sae})
    seen, handle = capture(model.transformer.h[1])
    try:
        torch_backend.reset_selection_counts()
        with im.interpretation_enabled():
            model(torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4)))
    finally:
        handle.remove()
    assert "bf16" not in im._topk_encoders[HP]._copies and torch_backend.SURVIVORS["rows"] == 0
    code = sae.encode_sparse(seen.pop().reshape(-1, D))
    assert torch.equal(im.trace[HP].rows()["indices"], code.indices)


def test_tracking_records_every_step_not_just_the_last(im, model, ids):
    with im.interpretation_enabled():
        out = im.generate(ids, max_new_tokens=5, kv_cache=KVCache())
    feats = im.get_active_features()
    assert set(feats) == {HP, PRE, ATTN}
    assert feats[HP].shape == (2 * 9 + 2 * 4, 256)  # prefill + 4 forwarded decode tokens
    assert (feats[HP] > 0).sum(1).eq(8).all()  # k = 8 latents per token
    idx, val = im.get_active_features(HP, top_k=3)[HP]
    assert idx.shape == val.shape == (26, 3)
    records = im.trace.records(HP)
    assert [r["token"] for r in records if r["batch"] == 0] == out[0, :13].tolist()
    assert [r["step"] for r in records[-2:]] == [4, 4]


def _encoded_batches(im, monkeypatch):
    """Rows per encode call at each hook point, as the traces ask for them."""
    calls = {hp: [] for hp in im.saes}
    top_features = im._top_features

    def spy(hp, rows):
        calls[hp].append(rows.shape[0])
        return top_features(hp, rows)
    monkeypatch.setattr(im, "_top_features", spy)
    return calls


def test_decode_rows_are_encoded_in_batches_with_the_same_features(model, ids, monkeypatch):
    saes = {HP: make_sae(), ATTN: make_sae(d_sae=128, k=4, seed=9)}
    at_once = InterpretableModel(model, saes, encode_rows=1)
    batched = InterpretableModel(model, saes, encode_rows=5)
    calls = _encoded_batches(batched, monkeypatch)
    for im in (at_once, batched):
        with im.interpretation_enabled():
            _kv_generate(model, ids, 3)  # a prefill of 2 x 3 rows, then six decode steps of 2 rows
    # 6 rows go at once; then 2 + 2 + 2 reach 5; then 2 + 2 + 2 again; nothing is left for the exit.
    assert calls == {HP: [6, 6, 6], ATTN: [6, 6, 6]}
    for hp in saes:
        rows_1, dense_1 = _by_position(at_once.trace, hp)
        rows_5, dense_5 = _by_position(batched.trace, hp)
        for key in ("step", "seq", "batch", "position"):
            assert torch.equal(rows_1[key], rows_5[key])
        torch.testing.assert_close(dense_5, dense_1, rtol=1e-5, atol=1e-6)
        for feature in range(0, saes[hp].d_sae, 7):
            want, got = at_once.trace.max_activating(hp, feature), batched.trace.max_activating(hp, feature)
            place = [{k: v for k, v in e.items() if k != "value"} for e in want]
            assert [{k: v for k, v in e.items() if k != "value"} for e in got] == place
            assert [e["value"] for e in got] == pytest.approx([e["value"] for e in want], rel=1e-5)


def test_held_rows_are_encoded_on_read_and_on_exit_with_the_weights_of_the_block(model, ids, monkeypatch):
    sae = make_sae()
    im = InterpretableModel(model, {HP: sae})
    calls = _encoded_batches(im, monkeypatch)
    seen, handle = capture(model.transformer.h[1])
    try:
        with im.interpretation_enabled():
            cache = KVCache()
            model(ids[:, :4], kv_cache=cache)
            model(ids[:, 4:5], kv_cache=cache)
            assert calls[HP] == []  # 10 rows held, fewer than encode_rows
            assert im.get_active_features(HP)[HP].shape == (10, 256)  # a read encodes them
            model(ids[:, 5:6], kv_cache=cache)
        assert calls[HP] == [10, 2]  # the exit encoded the last step's rows
        with torch.no_grad():
            sae.enc_weight.mul_(-1.5)  # after the block: the trace keeps the features it had
        rows = im.trace[HP].rows()
        want = make_sae().encode_sparse(torch.cat([s.reshape(-1, D) for s in seen]))
    finally:
        handle.remove()
    assert torch.equal(rows["indices"], want.indices.view(rows["indices"].shape))


def test_held_rows_are_copies_the_model_cannot_overwrite(model, ids, monkeypatch):
    # A model that reuses its activation buffer in place must not change what was tracked.
    im = InterpretableModel(model, {HP: make_sae()})
    block = model.transformer.h[1]
    kept = []
    handle = block.register_forward_hook(lambda _m, _a, out: kept.append(out))  # after tracking's hook
    try:
        with im.interpretation_enabled():
            model(ids[:1, :3])
            kept[-1].mul_(-7.0)  # the model writes over the tensor the hook saw
            model(ids[:1, :3])
    finally:
        handle.remove()
    dense = im.trace[HP].dense()
    torch.testing.assert_close(dense[:3], dense[3:], rtol=0, atol=0)


def test_rows_tracked_under_inference_mode_are_encoded_after_it(model, ids):
    im = InterpretableModel(model, {HP: make_sae()})
    with im.interpretation_enabled():
        with torch.inference_mode():
            model(ids)
    with torch.inference_mode():
        reference = InterpretableModel(model, {HP: make_sae()}, encode_rows=1)
        with reference.interpretation_enabled():
            model(ids)
    torch.testing.assert_close(im.trace[HP].dense(), reference.trace[HP].dense())


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "64", None])
def test_encode_rows_must_be_a_positive_integer(model, bad):
    with pytest.raises(ValueError, match=r"^encode_rows must be an integer >= 1, got "):
        InterpretableModel(model, {HP: make_sae()}, encode_rows=bad)


def test_max_activating_examples_match_brute_force(model, ids):
    im = InterpretableModel(model, {HP: make_sae()}, max_examples=3)
    with im.interpretation_enabled():
        im.trace[HP].encode_rows = 2  # several merges, including duplicates of a feature across chunks
        _kv_generate(model, ids, 3)
        model(ids[:, :5])  # a second sequence
    rows = im.trace[HP].rows()
    dense = im.trace[HP].dense()
    for feature in range(256):
        got = im.trace.max_activating(HP, feature)
        column = dense[:, feature]
        expected = column[column > 0].sort(descending=True).values[:3]
        assert [g["value"] for g in got] == pytest.approx(expected.tolist())
        for g in got:
            n = ((rows["step"] == g["step"]) & (rows["batch"] == g["batch"]) & (rows["position"] == g["position"]))
            assert float(column[n.nonzero()[0, 0]]) == pytest.approx(g["value"])


def test_examples_merged_on_demand_in_pieces_equal_those_merged_at_each_flush(model, ids, monkeypatch):
    from fastsae import trace

    monkeypatch.setattr(trace, "MERGE_ROWS", 3)  # several merges of whole chunks
    kept = InterpretableModel(model, {HP: make_sae()}, max_examples=3, encode_rows=2)
    examples_only = InterpretableModel(model, {HP: make_sae()}, max_examples=3, encode_rows=2, keep_trace=False)
    calls = _encoded_batches(kept, monkeypatch)
    for im in (kept, examples_only):
        with im.interpretation_enabled():
            _kv_generate(model, ids, 3)
            im.trace.max_activating(HP, 5)  # merges what is kept so far; later rows merge later
            model(ids[:, :5])
    assert calls[HP] == [6] + [2] * 6 + [10]
    assert kept.trace[HP]._merged == len(kept.trace[HP]._chunks) - 1  # the last chunk waits for a query
    for feature in range(256):
        assert kept.trace.max_activating(HP, feature) == examples_only.trace.max_activating(HP, feature)


def test_hooks_read_nothing_back_to_the_host(im, model, ids, monkeypatch):
    """No .item()/.cpu()/bool(tensor)... in the tracking or steering hooks (each would sync a GPU)."""
    def refuse(*_a, **_k):
        raise AssertionError("host read inside a hook")
    cache = KVCache()
    with im.interpretation_enabled(), im.steering_enabled({HP: [ablate(1), clamp(2, 1.0)], PRE: add(4, 0.5)}):
        for hp in im.saes:
            im.trace[hp].encode_rows = 2
        with monkeypatch.context() as m:
            for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            model(ids[:, :4], kv_cache=cache)
            for t in range(4, 9):
                model(ids[:, t:t + 1], kv_cache=cache)
    assert im.trace[HP].num_rows == 2 * 9


def test_trace_table_and_escaped_html(im, model, ids):
    class Tok:
        def decode(self, token_ids):
            return f"<t{token_ids[0]}>&"
    with im.interpretation_enabled():
        im.generate(ids[:1, :3], max_new_tokens=2, kv_cache=KVCache())
    table = im.trace.table(hook_point=HP)
    assert len(table.splitlines()) == 1 + 4 and "top features" in table
    page = im.trace.html(tokenizer=Tok(), hook_point=HP)
    assert f"&lt;t{int(ids[0, 0])}&gt;&amp;" in page and "<t" + str(int(ids[0, 0])) not in page


# ----------------------------------------------------------------------------- lifecycle

def test_contexts_are_independent(im, model, ids):
    plain = model(ids)
    with im.interpretation_enabled():
        with im.steering_enabled({HP: ablate(int(im.saes[HP].W_dec.norm(dim=1).argmax()))}):
            model(ids)
        assert torch.equal(model(ids), plain)  # steering gone, tracking still on
        assert im.trace[HP].num_rows == 2 * 2 * 9
    with im.steering_enabled({HP: add(0, 5.0)}):
        with im.interpretation_enabled():
            pass
        steered = model(ids)  # leaving tracking did not remove the steering hook
    assert not torch.allclose(steered, plain)
    assert all_hooks(model) == 0


def test_hooks_removed_on_exit_and_on_exceptions(im, model, ids):
    assert all_hooks(model) == 0
    with im.interpretation_enabled(), im.steering_enabled({HP: ablate(1)}):
        assert all_hooks(model) == 3 + 1 + 1  # tracking x3, the step counter, steering x1
    assert all_hooks(model) == 0
    with pytest.raises(KeyError, match="boom"):
        with im.interpretation_enabled(), im.steering_enabled({HP: ablate(1)}):
            model(ids)
            raise KeyError("boom")
    assert all_hooks(model) == 0
    with pytest.raises(RuntimeError, match="already active"):
        with im.interpretation_enabled(), im.interpretation_enabled():
            pass
    assert all_hooks(model) == 0
    assert torch.equal(model(ids), TinyGPT(VOCAB, D, n_layer=3, seed=0).eval()(ids))


# ----------------------------------------------------------------------------- errors and dtypes

def test_bad_steering_specs_are_clear_errors(im, model):
    with pytest.raises(IndexError, match=r"feature index 256 out of range .*blocks.1.hook_resid_post.*d_sae=256"):
        with im.steering_enabled({HP: (256, 2.0)}):
            pass
    with pytest.raises(IndexError, match="feature index -1 out of range"):
        im.steer(torch.zeros(1, 2, dtype=torch.long), (HP, -1), 2.0)
    with pytest.raises(ValueError, match="no SAE at hook point 'blocks.0.hook_resid_post'"):
        with im.steering_enabled({"blocks.0.hook_resid_post": (1, 2.0)}):
            pass
    with pytest.raises(ValueError, match="edit mode must be one of"):
        FeatureEdit(1, "double", 2.0)
    with pytest.raises(ValueError, match="edits a feature twice"):
        with im.steering_enabled({HP: [ablate(1), add(1, 2.0)]}):
            pass
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        im.generate(torch.zeros(1, 2, dtype=torch.long), temperature=0.5)
    assert all_hooks(model) == 0


def test_wrong_width_and_integer_activation_are_clear_errors(model, ids):
    im = InterpretableModel(model, {HP: make_sae(d_in=16)})
    with pytest.raises(ValueError, match=r"activation at 'blocks.1.hook_resid_post' has shape \(2, 9, 32\).*d_in=16"):
        with im.interpretation_enabled():
            model(ids)
    assert all_hooks(model) == 0

    class IdsModel(torch.nn.Module):  # a hook point whose activation is token ids
        def __init__(self):
            super().__init__()
            self.ids = torch.nn.Identity()
            self.emb = torch.nn.Embedding(VOCAB, D)

        def forward(self, idx):
            return self.emb(self.ids(idx))
    im = InterpretableModel(IdsModel(), {"ids": make_sae()})
    with pytest.raises(TypeError, match=r"activation at 'ids' has dtype torch.int64.*floating-point"):
        with im.steering_enabled({"ids": ablate(0)}):
            im(ids)


def test_bf16_model_with_fp32_sae(model, ids):
    model = model.to(torch.bfloat16)
    sae = make_sae()
    im = InterpretableModel(model, {HP: sae})
    assert im.saes[HP].dtype == torch.float32
    plain = model(ids)
    with im.interpretation_enabled(), im.steering_enabled({HP: (4, 1.0)}):
        same = model(ids)
    assert same.dtype == torch.bfloat16 and torch.equal(same, plain)
    assert im.trace[HP].rows()["values"].dtype == torch.float32
    seen, handle = capture(model.transformer.h[1])
    with torch.no_grad():
        model(ids)
        x = seen.pop()
        i = int(sae.encode_sparse(x.float().reshape(-1, D)).indices[0, 0])
        with im.steering_enabled({HP: ablate(i)}):
            model(ids)
    handle.remove()
    got = seen.pop()
    assert got.dtype == torch.bfloat16
    expected = x + (_hand_edit(x.float(), sae, i, ablate(i)) - x.float()).to(torch.bfloat16)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_hf_gpt2_generate_tracks_and_steers(gpt2, ids):
    attn = "blocks.0.hook_attn_out"  # GPT2Attention returns a tuple (output, weights)
    im = InterpretableModel(gpt2, {"blocks.1.hook_resid_post": make_sae(), attn: make_sae(seed=3)})
    plain = im.generate(ids, max_new_tokens=4)
    assert plain.shape == (2, 13)
    with im.interpretation_enabled():
        tracked = im.generate(ids, max_new_tokens=4)
    assert torch.equal(tracked, plain)
    assert [c.tokens for c in im.trace[attn]._chunks] == [9, 1, 1, 1]  # HF's cache: (B, 1, D) per step
    assert im.get_active_features(attn)[attn].shape == (2 * 12, 256)
    assert torch.equal(im.steer(ids, (attn, 3), 1.0, max_new_tokens=4), plain)
    feature = int(im.saes[attn].W_dec.norm(dim=1).argmax())
    steered = im.steer(ids, (attn, feature), 50.0, mode="add", max_new_tokens=4)
    assert not torch.equal(steered, plain)
    logits = gpt2(ids).logits
    with im.steering_enabled({attn: (feature, 1.0), "blocks.1.hook_resid_post": ablate(feature)}):
        assert not torch.equal(gpt2(ids).logits, logits)
    assert all_hooks(gpt2) == 0


# ----------------------------------------------------------------------------- nanochat's Engine

def _nanochat_engine_setup():
    from nanochat_stub import nanochat

    gpt_module = nanochat("gpt")
    torch.manual_seed(0)
    gpt = gpt_module.GPT(gpt_module.GPTConfig(n_embd=32)).eval()
    saes = {"blocks.1.hook_resid_post": make_sae(d_in=32, d_sae=64, k=4)}
    return nanochat("engine").Engine, gpt, nanochat("tokenizer").ByteTokenizer(), saes


@pytest.mark.parametrize("wrap", [True, False], ids=["engine-on-wrapper", "engine-on-model"])
def test_engine_with_two_samples_records_positions_and_tokens(wrap):
    """Engine prefills the prompt once (batch 1) through model.forward, then decodes 2 rows."""
    Engine, gpt, tokenizer, saes = _nanochat_engine_setup()
    im = InterpretableModel(gpt, saes)
    engine = Engine(im if wrap else gpt, tokenizer)  # the wrapper passes get_device and config through
    prompt = tokenizer.encode("hello there", prepend=tokenizer.get_bos_token_id())
    with im.interpretation_enabled():
        rows = engine.generate_batch(prompt, num_samples=2, max_tokens=4)
    records = im.trace.records("blocks.1.hook_resid_post")
    n = len(prompt)
    prefill, decode = records[:n], records[n:]
    assert [r["position"] for r in prefill] == list(range(n))
    assert [r["token"] for r in prefill] == prompt
    # one decode forward per generated column, 2 rows each, continuing at position n
    assert [(r["batch"], r["position"]) for r in decode] == [(b, n + i) for i in range(4) for b in (0, 1)]
    assert [r["token"] for r in decode] == [rows[b][n + i] for i in range(4) for b in (0, 1)]
    assert "?" not in im.trace.table(tokenizer, "blocks.1.hook_resid_post").split("\n", 1)[1]


def test_wrapper_passes_model_attributes_through():
    _, gpt, _, saes = _nanochat_engine_setup()
    im = InterpretableModel(gpt, saes)
    assert im.config is gpt.config and im.get_device() == gpt.get_device()
    with pytest.raises(AttributeError, match="no_such_thing"):
        im.no_such_thing  # noqa: B018


# ----------------------------------------------------------------------------- transcoders

MLP_IN, MLP_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"


def make_transcoder(architecture="skip_transcoder", seed=3):
    sae = create_sae(SAEConfig(d_in=D, d_sae=96, k=6, seed=seed, architecture=architecture, hook_point=MLP_IN,
                               output_hook_point=MLP_OUT))
    with torch.no_grad():
        sae.b_enc.add_(0.05)
        if architecture == "skip_transcoder":
            sae.W_skip.copy_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    return sae


def _with_mlp_output(model, change):
    """Run model.transformer.h[1].mlp as f(h) = mlp(h) + change(h, mlp(h))."""
    mlp = model.transformer.h[1].mlp
    original = mlp.forward
    mlp.forward = lambda h: original(h) + change(h, original(h))
    return lambda: setattr(mlp, "forward", original)


@pytest.mark.parametrize("edit", [ablate(0), clamp(0, 3.0), scale(0, -2.0), add(0, 1.5)], ids=lambda e: e.mode)
def test_transcoder_steering_edits_the_mlp_output(model, ids, edit):
    sae = make_transcoder()
    im = InterpretableModel(model, {MLP_IN: sae})
    with torch.no_grad():
        seen = []
        handle = model.transformer.h[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        model(ids)
        handle.remove()
        feature = int(sae.encode_sparse(seen[0].reshape(-1, D)).indices[0, 0])
        edit = FeatureEdit(feature, edit.mode, edit.value)
        with im.steering_enabled({MLP_IN: edit}):
            steered = model(ids)

        def change(h, _out):  # the edit computed by hand from the MLP's input: (f' - f) W_dec[feature]
            f = sae.encode(h)[..., feature:feature + 1]
            new = {"ablate": 0 * f, "clamp": torch.full_like(f, edit.value), "scale": edit.value * f,
                   "add": f + edit.value}[edit.mode]
            return (new - f) * sae.W_dec[feature]

        restore = _with_mlp_output(model, change)
        try:
            expected = model(ids)
        finally:
            restore()
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, model(ids))


def test_transcoder_tracking_reads_the_mlp_input_and_generation_works(model, ids):
    sae = make_transcoder("transcoder")
    im = InterpretableModel(model, {MLP_IN: sae})
    seen = []
    handle = model.transformer.h[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with im.interpretation_enabled(), torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad():
        expected = sae.encode(seen[0].reshape(-1, D))
    torch.testing.assert_close(im.trace[MLP_IN].dense(), expected, rtol=1e-5, atol=1e-5)
    plain = im.generate(ids, max_new_tokens=4, kv_cache=KVCache())
    feature = int(sae.W_dec.norm(dim=1).argmax())
    steered = im.steer(ids, (MLP_IN, feature), 60.0, mode="add", max_new_tokens=4, kv_cache=KVCache())
    assert steered.shape == plain.shape and not torch.equal(steered, plain)
