"""StreamSource: training straight from the model's forward, nothing on disk, on the nanochat stand-in."""

import pytest
import torch
from nanochat_stub import number_docs  # noqa: E402

from fastsae.config import SAEConfig  # noqa: E402
from fastsae.data import StreamSource, TensorSource, window_shuffled_batches  # noqa: E402
from fastsae.models import create_sae  # noqa: E402
from fastsae.store import collect_to_store  # noqa: E402
from fastsae.trainer import SAETrainer  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def docs(n=200):
    return number_docs(n)


def test_window_shuffle_keeps_every_row_once_and_bounds_what_it_holds():
    rows = torch.arange(1000.0).unsqueeze(1)
    batches = list(window_shuffled_batches(rows.split(37), window_rows=128, batch_rows=50, seed=3, epoch=1))
    seen = torch.cat(batches).squeeze(1)
    assert len(batches) == 20 and seen.numel() == 1000  # 1000 rows, batches of 50: none left over
    assert sorted(seen.tolist()) == list(range(1000))
    assert not torch.equal(seen, torch.arange(1000.0))  # shuffled ...
    assert (seen[:128] < 128 + 37).all()  # ... within a window (plus the chunk that completed it)
    again = torch.cat(list(window_shuffled_batches(rows.split(37), 128, 50, seed=3, epoch=1)))
    other = torch.cat(list(window_shuffled_batches(rows.split(37), 128, 50, seed=3, epoch=2)))
    assert torch.equal(again.squeeze(1), seen) and not torch.equal(other.squeeze(1), seen)


def test_stream_rows_equal_a_collected_store_and_training_on_them_matches(tiny, tmp_path):
    model, tok = tiny
    store = collect_to_store(model, tok, docs(), HOOK, tmp_path / "store", 3000, batch_size=32,
                             context_length=128, shard_tokens=1024, progress=False)
    stream = StreamSource(model, tok, docs(), HOOK, 3000, window_rows=700)
    assert torch.equal(torch.cat(list(stream.chunks())), store.load_all())  # the same rows, in order
    assert torch.equal(stream.sample(100, seed=0), store.load_all()[:100])
    stored = store.load_all()
    small_chunks = StreamSource(model, tok, docs(), HOOK, 3000, batch_size=4)  # ~500 rows a chunk
    rows = torch.cat(list(small_chunks.chunks()))
    spanning = small_chunks.sample(1700, seed=0)
    assert torch.equal(spanning, rows[:1700]) and len(small_chunks._kept) > 2
    spanning.zero_()  # a sample is the caller's own copy: the kept chunks are untouched
    assert torch.equal(small_chunks.sample(1200, seed=0), rows[:1200])
    batches = list(stream.epoch_batches(1, 0, 10**9, 5, 256, 0, 1))
    expected = list(window_shuffled_batches(stored.split(777), 700, 256, 5, 1))  # chunking does not matter
    assert len(batches) == len(expected) == 11 and all(torch.equal(a, b) for a, b in zip(batches, expected))

    config = SAEConfig(d_in=16, d_sae=64, k=4, batch_size=256, num_epochs=2, dtype="float32", warmup_steps=5)
    streamed = SAETrainer(create_sae(config), config, stream, device="cpu")
    read_before, kept_before = stream.rows_out, sum(c.shape[0] for c in stream._kept)
    streamed.train(verbose=False)

    class Replay(TensorSource):  # the stored rows in the stream's order: what the stream must equal
        def epoch_batches(self, epoch, start, steps, seed, global_batch, rank, world_size):
            batches = window_shuffled_batches(self.x.split(1024), 700, global_batch, seed, epoch)
            for t, x in enumerate(batches):
                if start <= t < steps:
                    yield x

        def sample(self, n, seed):
            return self.x[:n]

    replay = SAETrainer(create_sae(config), config, stored, device="cpu")
    replay.data = Replay(stored, "activations")
    replay.train(verbose=False)
    assert streamed.step == replay.step == 22
    for name, value in replay.sae.state_dict().items():
        torch.testing.assert_close(streamed.sae.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # The initialisation sample (8192 rows asked for) extended the kept first chunk (the sample of
    # 100) to all 3000 rows: the model ran for that extension only, the epochs came from memory.
    assert kept_before < 3000 <= sum(c.shape[0] for c in stream._kept)
    assert stream.rows_out - read_before == sum(c.shape[0] for c in stream._kept) - kept_before


def test_a_stream_starts_each_epoch_from_its_kept_sample_and_times_the_model(tiny):
    model, tok = tiny
    stream = StreamSource(model, tok, docs(2000), HOOK, 20_000, window_rows=4096)
    config = SAEConfig(d_in=16, d_sae=64, k=4, batch_size=1000, num_epochs=2, dtype="float32")
    trainer = SAETrainer(create_sae(config), config, stream, device="cpu", log_every=5)
    trainer.train(verbose=False)
    kept = sum(c.shape[0] for c in stream._kept)
    assert 8192 <= kept < 20_000  # the initialisation sample, in whole model batches
    # Each epoch reads the rest from the model (its last batch in full: up to a chunk more).
    per_epoch = (stream.rows_out - kept) / 2
    assert 20_000 - kept <= per_epoch < 20_000 - kept + max(c.shape[0] for c in stream._kept)
    # Its records split the time between the model and the SAE steps; stored rows have no model.
    last = trainer.history[-1]
    # (the model's rows during training over its seconds then, which exclude the sample's)
    assert last["model_tokens_per_s"] >= (stream.rows_out - kept) / stream.model_seconds > 0
    assert last["sae_tokens_per_s"] > 0
    rows = torch.cat(list(stream.chunks()))
    alone = StreamSource(model, tok, docs(2000), HOOK, 20_000)
    assert torch.equal(rows, torch.cat(list(alone.chunks())))  # memory, then the model: the same rows
    stored = SAETrainer(create_sae(config), config, rows, device="cpu", log_every=5)
    stored.train(verbose=False)
    assert "model_tokens_per_s" not in stored.history[-1]


def test_stream_memory_does_not_grow_with_the_tokens(tiny):
    # What the batches are made from is one window (plus a chunk) whatever num_rows is.
    model, tok = tiny
    held = []
    for num_rows in (1000, 10_000):
        stream = StreamSource(model, tok, docs(2000), HOOK, num_rows, window_rows=512)
        biggest = 0
        for x in stream.epoch_batches(0, 0, 10**9, 0, 64, 0, 1):
            biggest = max(biggest, x.untyped_storage().nbytes())  # the window tensor a batch is a view of
        held.append(biggest)
    assert held[0] == held[1] and held[0] <= (512 + 64 + 128) * 16 * 4


def test_a_short_corpus_is_a_clear_error(tiny):
    model, tok = tiny
    stream = StreamSource(model, tok, docs(3), HOOK, 10_000)
    with pytest.raises(ValueError, match="the corpus ended .* tokens short of the 10000 asked for streaming"):
        list(stream.chunks())


# ----------------------------------------------------------------------------- several SAEs, one forward

MLP_IN, MLP_OUT, RESID0 = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"


def _together_configs():
    common = dict(batch_size=200, num_epochs=2, dtype="float32", warmup_steps=5, save_every=10**6)
    return [SAEConfig(d_in=16, d_sae=48, k=4, hook_point=RESID0, **common),
            SAEConfig(d_in=16, d_sae=32, k=3, architecture="transcoder", hook_point=MLP_IN,
                      output_hook_point=MLP_OUT, **common)]


def _state(sae):
    return {k: v.clone() for k, v in sae.state_dict().items()}


def test_train_together_runs_the_model_once_and_equals_training_alone(tiny, tmp_path, monkeypatch):
    from fastsae.data import ColumnSlice
    from fastsae.trainer import train_together

    model, tok = tiny
    monkeypatch.setattr("fastsae.trainer.INIT_SAMPLE_ROWS", 500)  # a sample of 1 of the 2 model batches
    stream = StreamSource(model, tok, docs(), (RESID0, MLP_IN, MLP_OUT), 2000, window_rows=600)
    columns = [(0, 16), (16, 48)]  # the SAE's resid_post; the transcoder's [mlp_in | mlp_out]
    forwards = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(1) or original(*a, **k))
    trainers = [SAETrainer(create_sae(c), c, ColumnSlice(stream, a, b), device="cpu", save_dir=tmp_path / str(i))
                for i, (c, (a, b)) in enumerate(zip(_together_configs(), columns))]
    train_together(trainers, verbose=False)
    together_forwards = len(forwards)
    for i, (config, (a, b)) in enumerate(zip(_together_configs(), columns)):
        forwards.clear()
        alone = SAETrainer(create_sae(config), config, ColumnSlice(stream, a, b), device="cpu")
        alone.train(verbose=False)
        for name, value in _state(alone.sae).items():
            assert torch.equal(value, trainers[i].sae.state_dict()[name]), name
        assert (tmp_path / str(i) / "final_model" / "cfg.json").is_file()
    # A pass over the 2000 tokens is 2 forwards. Together: the initialisation sample's (kept, for
    # the second SAE and as the start of every epoch), then the second batch of each epoch, for
    # both SAEs: 3. Alone, on the same stream: the second batch of each of its 2 epochs.
    assert len(forwards) == 2 and together_forwards == 3


def test_train_together_stops_and_resumes_bit_for_bit(tiny, tmp_path):
    from fastsae.data import ColumnSlice
    from fastsae.trainer import train_together

    model, tok = tiny
    rows = TensorSource(StreamSource(model, tok, docs(), (RESID0, MLP_IN, MLP_OUT), 2000).sample(2000, 0), "rows")
    columns = [(0, 16), (16, 48)]

    def trainers(root):
        return [SAETrainer(create_sae(c), c, ColumnSlice(rows, a, b), device="cpu", save_dir=root / str(i))
                for i, (c, (a, b)) in enumerate(zip(_together_configs(), columns))]

    whole = trainers(tmp_path / "whole")
    train_together(whole, verbose=False)
    train_together(trainers(tmp_path / "parts"), verbose=False, max_steps=7)
    resumed = trainers(tmp_path / "parts")
    train_together(resumed, verbose=False, resume=True)
    assert all(t.resumed_step == 7 for t in resumed)
    for a, b in zip(whole, resumed):
        for name, value in _state(a.sae).items():
            assert torch.equal(value, b.sae.state_dict()[name]), name
    other = TensorSource(rows.x.clone(), "copy")
    with pytest.raises(ValueError, match="ColumnSlice of one source"):
        train_together([SAETrainer(create_sae(c), c, ColumnSlice(other, a, b), device="cpu")
                        for c, (a, b) in zip(_together_configs(), columns)] + [whole[0]])
    with pytest.raises(ValueError, match=r"columns \[40, 60\) are not within the source's width 48"):
        ColumnSlice(rows, 40, 60)


def _stream_rank(rank, world_size, init_file, root, columns):
    """One rank of a gloo group reading a stream over three hook points: its rows, the rows of
    a kept sample, and how many forwards it ran."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from nanochat_stub import tiny_model
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, tok = tiny_model()
        forwards = []
        model.transformer.wte.register_forward_pre_hook(lambda *_: forwards.append(1))
        stream = StreamSource(model, tok, docs(), (RESID0, MLP_IN, MLP_OUT), 2000, window_rows=600, batch_size=4,
                              context_length=24, columns=None if columns is None else columns[rank])
        before = len(forwards)
        rows = torch.cat(list(stream.chunks()))
        ran = len(forwards) - before
        sample = stream.sample(700, 0)
        batches = torch.cat(list(stream.epoch_batches(0, 0, 3, 5, 400, rank, world_size)))
        save_file({"rows": rows, "sample": sample, "batches": batches}, str(Path(root) / f"rank{rank}.safetensors"))
        (Path(root) / f"rank{rank}.json").write_text(json.dumps({"forwards": ran}))
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort its peer)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("columns", [None, [list(range(0, 16)), list(range(16, 48))]],
                         ids=["every-column", "own-columns"])
def test_ranks_share_the_streams_forwards_and_see_the_one_process_rows(tiny, tmp_path, columns):
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    model, tok = tiny
    alone = StreamSource(model, tok, docs(), (RESID0, MLP_IN, MLP_OUT), 2000, window_rows=600, batch_size=4,
                         context_length=24)
    forwards = []
    handle = model.transformer.wte.register_forward_pre_hook(lambda *_: forwards.append(1))
    rows = torch.cat(list(alone.chunks()))
    handle.remove()
    batches = torch.cat(list(alone.epoch_batches(0, 0, 3, 5, 400, 0, 1)))
    mp.spawn(_stream_rank, args=(2, str(tmp_path / "init"), str(tmp_path), columns), nprocs=2, join=True)
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        keep = slice(None) if columns is None else columns[rank]
        assert torch.equal(got["rows"], rows[:, keep])  # every row, in the one process's order
        assert torch.equal(got["sample"], rows[:700, keep])
        # Data parallel (every column): rank r trains on its half of each global batch.
        half = batches.reshape(3, 400, -1)[:, rank * 200:(rank + 1) * 200].reshape(600, -1)
        assert torch.equal(got["batches"], half[:, keep])
        # Reading the 2000 tokens took the one process 26 forwards; each rank ran every other one.
        assert len(forwards) == 26
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["forwards"] == 13
