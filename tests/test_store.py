"""The on-disk activation store, on the real all-MiniLM-L6-v2 over the default corpus (Python's
own docs), and on the nanochat stand-in for the cheap edge cases."""
import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tokenizer import ByteTokenizer  # noqa: E402
from nanochat_stub import number_docs  # noqa: E402

from fastsae.corpus import Corpus, default_corpus, iter_token_batches  # noqa: E402
from fastsae.hooks import collect_activations_from_dataloader  # noqa: E402
from fastsae.sources import load_default_model  # noqa: E402
from fastsae.store import (  # noqa: E402
    ActivationStore,
    StoreMismatchError,
    collect_to_store,
    collect_to_stores,
    model_fingerprint,
)

HOOK = "blocks.1.hook_resid_post"  # an early layer: the forward stops after block 1
TOKENS, SHARD, CONTEXT, BATCH = 20_480, 4096, 64, 128
SETTINGS = dict(batch_size=BATCH, context_length=CONTEXT, shard_tokens=SHARD, progress=False)


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer, info = load_default_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def full_store(minilm, tmp_path_factory):
    model, tokenizer = minilm
    directory = tmp_path_factory.mktemp("full")
    start = time.perf_counter()
    store = collect_to_store(model, tokenizer, default_corpus(), HOOK, directory, TOKENS,
                             model_name="all-MiniLM-L6-v2", **SETTINGS)
    seconds = time.perf_counter() - start
    print(f"\ncollected {store.num_tokens} tokens in {seconds:.1f}s ({store.num_tokens / seconds:.0f} tokens/s)")
    return store


def _shard_tensors(store):
    return [load_file(store.store_dir / s["file"]) for s in store.shards]


def test_manifest_shapes_dtypes_metadata(full_store, minilm):
    m = full_store.manifest
    assert m["complete"] and not m["corpus_exhausted"]
    assert (m["hook_point"], m["d_in"], m["dtype"], m["token_count"]) == (HOOK, 384, "float32", TOKENS)
    assert m["model_name"] == "all-MiniLM-L6-v2" and m["model_fingerprint"] == model_fingerprint(minilm[0])
    assert m["corpus"]["name"].startswith("python-docs-")
    assert [s["num_tokens"] for s in m["shards"]] == [SHARD] * 5
    shard = full_store.read_shard(0)
    assert shard["activations"].shape == (SHARD, 384) and shard["activations"].dtype == torch.float32
    assert torch.isfinite(shard["activations"]).all()
    assert shard["token_index"].tolist() == list(range(SHARD))
    # metadata is the tokenized corpus with padding removed
    first = next(iter(iter_token_batches(minilm[1], default_corpus(), CONTEXT, BATCH)))
    keep = first.attention_mask.bool()
    n = min(int(keep.sum()), SHARD)
    assert shard["token_ids"][:n].tolist() == first.input_ids[keep][:n].tolist()
    assert shard["doc_ids"][:n].tolist() == first.doc_ids[keep][:n].tolist()
    assert shard["positions"][:n].tolist() == first.positions[keep][:n].tolist()
    assert sorted(p.name for p in full_store.store_dir.iterdir()) == ["manifest.json"] + [
        f"shard_{i:06d}.safetensors" for i in range(5)]


def test_store_equals_in_memory_collection_exactly(full_store, minilm):
    model, tokenizer = minilm
    batches = iter_token_batches(tokenizer, default_corpus(), CONTEXT, BATCH)
    in_memory = collect_activations_from_dataloader(model, batches, HOOK, max_activations=SHARD, verbose=False)[HOOK]
    assert torch.equal(full_store.read_shard(0)["activations"], in_memory)
    # and the hook sees what the model computes: block 1 output is hidden_states[2]
    first = next(iter(iter_token_batches(tokenizer, default_corpus(), CONTEXT, BATCH)))
    ids, mask = first.input_ids[:16], first.attention_mask[:16]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    n = int(mask.sum())
    torch.testing.assert_close(in_memory[:n], hidden[mask.bool()], atol=1e-4, rtol=1e-4)


def test_shuffle_covers_every_token_once_per_epoch(full_store):
    everything = full_store.load_all()

    def epoch(**kw):
        batches = list(full_store.iter_batches(1000, seed=3, buffer_tokens=5000, block_tokens=512,
                                               with_metadata=True, **kw))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1]["token_index"] for b in batches]), batches

    acts, index, batches = epoch()
    assert sorted(index.tolist()) == list(range(TOKENS))
    assert torch.equal(acts, everything[index])
    assert [len(b[0]) for b in batches] == [1000] * 20 + [480]
    assert (index[:1000].diff() != 1).float().mean() > 0.9  # actually shuffled
    assert torch.equal(epoch()[1], index)  # same seed and epoch: same order
    assert not torch.equal(epoch(epoch=1)[1], index)
    dropped = epoch(drop_last=True)[1]
    assert len(dropped) == 20_000 and len(set(dropped.tolist())) == 20_000
    unshuffled = torch.cat(list(full_store.iter_batches(4096, shuffle=False)))
    assert torch.equal(unshuffled, everything)


def test_reading_holds_one_buffer_not_the_store(full_store, monkeypatch):
    reads = []
    read_blocks = full_store._read_blocks

    def spy(blocks, with_metadata):
        data = read_blocks(blocks, with_metadata)
        reads.append(len(data["activations"]))
        return data

    monkeypatch.setattr(full_store, "_read_blocks", spy)
    total = sum(len(b) for b in full_store.iter_batches(300, buffer_tokens=3000, block_tokens=500))
    assert total == TOKENS and sum(reads) == TOKENS
    assert max(reads) < 3000 + 500  # a buffer's worth at a time, never the whole store


def test_ranks_are_disjoint_and_cover_everything(full_store):
    seen = []
    for rank in range(3):
        batches = full_store.iter_batches(512, seed=0, rank=rank, world_size=3, with_metadata=True, block_tokens=1024)
        seen.append(torch.cat([m["token_index"] for _, m in batches]))
    assert sorted(torch.cat(seen).tolist()) == list(range(TOKENS))
    assert max(len(s) for s in seen) - min(len(s) for s in seen) <= 1024
    with pytest.raises(ValueError, match="rank must be in"):
        next(full_store.iter_batches(8, rank=3, world_size=3))


def test_batches_on_requested_device_and_dtype(full_store):
    batch = next(full_store.iter_batches(256, device="cpu", dtype=torch.bfloat16))
    assert batch.shape == (256, 384) and batch.dtype == torch.bfloat16 and batch.device.type == "cpu"


def test_interrupted_then_resumed_equals_uninterrupted(full_store, minilm, tmp_path):
    model, tokenizer = minilm

    class Interrupt(Exception):
        pass

    def stop_after_two(index, manifest):
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        collect_to_store(model, tokenizer, default_corpus(), HOOK, tmp_path, TOKENS, model_name="all-MiniLM-L6-v2",
                         on_shard=stop_after_two, **SETTINGS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["token_count"] == 2 * SHARD and len(manifest["shards"]) == 2
    with pytest.raises(RuntimeError, match=r"incomplete: collection stopped after 8192 of 20480 tokens.*resume"):
        ActivationStore(tmp_path)
    assert ActivationStore(tmp_path, allow_incomplete=True).load_all().shape == (2 * SHARD, 384)
    # debris of a write killed mid-shard: neither may be taken for data
    (tmp_path / "shard_000002.safetensors").write_bytes(b"garbage")
    (tmp_path / ".shard_000003.safetensors.tmp").write_bytes(b"garbage")

    forwards = []
    handle = model.embeddings.register_forward_hook(lambda *a: forwards.append(1))
    try:
        resumed = collect_to_store(model, tokenizer, default_corpus(), HOOK, tmp_path, TOKENS,
                                   model_name="all-MiniLM-L6-v2", **SETTINGS)
    finally:
        handle.remove()
    assert len(forwards) <= 4  # only the last 12288 tokens were run through the model
    assert resumed.manifest == full_store.manifest
    for got, want in zip(_shard_tensors(resumed), _shard_tensors(full_store), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp_path.glob(".*.tmp"))


def test_store_from_another_model_or_hook_is_refused(full_store, minilm):
    model, tokenizer = minilm
    before = (full_store.store_dir / "manifest.json").read_bytes()
    with pytest.raises(StoreMismatchError, match=r"hook_point: store has 'blocks.1.hook_resid_post', now "
                                                 r"'blocks.0.hook_resid_post'.*overwrite=True"):
        collect_to_store(model, tokenizer, default_corpus(), "blocks.0.hook_resid_post", full_store.store_dir, TOKENS,
                         **SETTINGS)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.layer[3].output.dense.weight.mul_(1.01)
    with pytest.raises(StoreMismatchError, match="model_fingerprint: store has"):
        collect_to_store(other, tokenizer, default_corpus(), HOOK, full_store.store_dir, TOKENS, **SETTINGS)
    with pytest.raises(StoreMismatchError, match="context_length: store has 64, now 32"):
        collect_to_store(model, tokenizer, default_corpus(), HOOK, full_store.store_dir, TOKENS,
                         **{**SETTINGS, "context_length": 32})
    with pytest.raises(StoreMismatchError, match="does not match: model_fingerprint"):
        ActivationStore(full_store.store_dir, model=other)
    with pytest.raises(StoreMismatchError, match="d_in: store has 384, now 512"):
        ActivationStore(full_store.store_dir, d_in=512)
    ActivationStore(full_store.store_dir, model=model, hook_point=HOOK, d_in=384)  # the right ones pass
    assert (full_store.store_dir / "manifest.json").read_bytes() == before  # refusals change nothing


# ---- cheap edge cases on the nanochat stand-in -----------------------------------------------

def docs(n=40):
    return number_docs(n)


def test_bad_hook_or_empty_corpus_leaves_nothing(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown hook point 'blocks.0.hook_resid'"):
        collect_to_store(model, tok, docs(), "blocks.0.hook_resid", tmp_path / "a", 100, progress=False)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        collect_to_store(model, tok, docs(), "blocks.2.hook_mlp_out", tmp_path / "a", 100, progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="corpus 'empty' is empty"):
        collect_to_store(model, tok, Corpus("empty", lambda: [], "e"), "blocks.0.hook_mlp_out", tmp_path / "b", 100,
                         progress=False)
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path / "b")


def test_extending_a_store_equals_collecting_more_at_once(tiny, tmp_path):
    model, tok = tiny
    kw = dict(batch_size=4, context_length=24, shard_tokens=300, progress=False, drop_bos=True)
    once = collect_to_store(model, tok, docs(), "blocks.1.hook_mlp_hidden", tmp_path / "once", 1000, **kw)
    small = collect_to_store(model, tok, docs(), "blocks.1.hook_mlp_hidden", tmp_path / "grown", 450, **kw)
    assert [s["num_tokens"] for s in small.shards] == [300, 150]
    assert 0 not in small.read_shard(0)["positions"].tolist()  # BOS dropped
    grown = collect_to_store(model, tok, docs(), "blocks.1.hook_mlp_hidden", tmp_path / "grown", 1000, **kw)
    assert [s["num_tokens"] for s in grown.shards] == [300, 300, 300, 100]
    assert torch.equal(grown.load_all(), once.load_all())
    again = collect_to_store(model, tok, docs(), "blocks.1.hook_mlp_hidden", tmp_path / "grown", 1000, **kw)
    assert again.manifest == grown.manifest


def _counting_forwards(model):
    calls = []
    handle = model.transformer.wte.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_several_hook_points_from_one_forward_equal_one_collection_each(tiny, tmp_path):
    model, tok = tiny
    kw = dict(batch_size=4, context_length=24, shard_tokens=300, progress=False)
    hooks = ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_hidden", "blocks.1.hook_resid_post"]
    calls, handle = _counting_forwards(model)
    try:
        alone = {hp: collect_to_store(model, tok, docs(), hp, tmp_path / "alone" / hp, 1000, **kw) for hp in hooks}
        one_pass = len(calls) // len(hooks)
        calls.clear()
        together = collect_to_stores(model, tok, docs(), {hp: tmp_path / "together" / hp for hp in hooks}, 1000, **kw)
    finally:
        handle.remove()
    assert len(calls) == one_pass  # one forward per batch for all three
    for hp in hooks:
        assert together[hp].hook_point == hp and together[hp].manifest["complete"]
        assert [s["num_tokens"] for s in together[hp].shards] == [300, 300, 300, 100]
        for a, b in zip(_shard_tensors(alone[hp]), _shard_tensors(together[hp])):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert together["blocks.1.hook_mlp_hidden"].d_in == 64 and together["blocks.0.hook_attn_out"].d_in == 16


def test_several_stores_resume_each_from_where_it_stopped(tiny, tmp_path):
    # One store holds 600 tokens already (an earlier run), the other none: the model runs from
    # token 0 for the new one, the old one only appends what it lacks.
    model, tok = tiny
    kw = dict(batch_size=4, context_length=24, shard_tokens=300, progress=False)
    a, b = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    collect_to_store(model, tok, docs(), a, tmp_path / "a", 600, **kw)
    written = []
    stores = collect_to_stores(model, tok, docs(), {a: tmp_path / "a", b: tmp_path / "b"}, 1000,
                               on_shard=lambda i, m: written.append((m["hook_point"], i)), **kw)
    assert sorted(written) == [(a, 2), (a, 3), (b, 0), (b, 1), (b, 2), (b, 3)]
    once = collect_to_store(model, tok, docs(), a, tmp_path / "once", 1000, **kw)
    assert torch.equal(stores[a].load_all(), once.load_all())
    assert stores[b].num_tokens == 1000


def test_several_stores_need_distinct_folders_and_known_hooks(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="every hook point needs a directory of its own"):
        collect_to_stores(model, tok, docs(), {"blocks.0.hook_resid_post": tmp_path / "s",
                                               "blocks.1.hook_resid_post": tmp_path / "s"}, 100, progress=False)
    with pytest.raises(ValueError, match="unknown hook point 'blocks.1.hook_nope'"):
        collect_to_stores(model, tok, docs(), {"blocks.0.hook_resid_post": tmp_path / "a",
                                               "blocks.1.hook_nope": tmp_path / "b"}, 100, progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="store_dirs is empty"):
        collect_to_stores(model, tok, docs(), {}, 100, progress=False)


def _rank_worker(rank, world_size, init_file, root, max_tokens, stop_after_shards):
    """One rank of a gloo group collecting two hook points; with ``stop_after_shards`` it dies
    (as a killed process) after writing that many shards."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model, tok = GPT(GPTConfig(n_layer=2, n_embd=16)).eval(), ByteTokenizer()
    calls, handle = _counting_forwards(model)
    written = []

    def on_shard(index, manifest):
        written.append(index)
        if stop_after_shards is not None and len(written) >= stop_after_shards:
            raise SystemExit(3)  # no finish, no manifest: as if killed

    try:
        collect_to_stores(model, tok, docs(), {hp: Path(root) / hp for hp in ("blocks.0.hook_resid_post",
                                                                              "blocks.1.hook_mlp_hidden")},
                          max_tokens, batch_size=4, context_length=24, shard_tokens=200, progress=False,
                          on_shard=on_shard, distributed=True)
        (Path(root) / f"forwards_{rank}.json").write_text(json.dumps({"forwards": len(calls), "shards": written}))
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort its peer)
    finally:
        handle.remove()
        if stop_after_shards is None:
            dist.destroy_process_group()


def test_ranks_split_the_collection_and_equal_one_process(tiny, tmp_path):
    model, tok = tiny
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_hidden")
    kw = dict(batch_size=4, context_length=24, shard_tokens=200, progress=False)
    calls, handle = _counting_forwards(model)
    try:
        alone = collect_to_stores(model, tok, docs(), {hp: tmp_path / "alone" / hp for hp in hooks}, 1100, **kw)
    finally:
        handle.remove()
    root = tmp_path / "ranks"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(root), 1100, None), nprocs=2, join=True)
    for hp in hooks:
        ranked = ActivationStore(root / hp)
        assert ranked.manifest["shards"] == alone[hp].manifest["shards"]  # 6 shards: 5 of 200 and one of 100
        assert ranked.manifest["token_count"] == 1100 and not ranked.manifest["corpus_exhausted"]
        for a, b in zip(_shard_tensors(alone[hp]), _shard_tensors(ranked)):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert not list((root / hp).glob("progress_*"))
    reports = [json.loads((root / f"forwards_{r}.json").read_text()) for r in (0, 1)]
    assert sorted(reports[0]["shards"]) == [0, 0, 2, 2, 4, 4] and sorted(reports[1]["shards"]) == [1, 1, 3, 3, 5, 5]
    # Each rank ran the model for its own shards only: batches that straddle two ranks' shards run
    # on both (here batches of ~80 tokens against shards of 200), so the split is 10 / 14 each.
    assert all(r["forwards"] < 0.75 * len(calls) for r in reports)
    assert sum(r["forwards"] for r in reports) < 1.5 * len(calls)


def test_a_killed_rank_split_collection_resumes_to_the_same_store(tiny, tmp_path):
    model, tok = tiny
    hp = "blocks.0.hook_resid_post"
    alone = collect_to_store(model, tok, docs(), hp, tmp_path / "alone", 1100, batch_size=4, context_length=24,
                             shard_tokens=200, progress=False)
    root = tmp_path / "ranks"
    with pytest.raises(mp.ProcessExitedException):  # each rank dies after 2 of its 6 shards (two stores)
        mp.spawn(_rank_worker, args=(2, str(tmp_path / "init1"), str(root), 1100, 2), nprocs=2, join=True)
    assert not (root / hp / "manifest.json").exists() and list((root / hp).glob("progress_rank*_of_2.json"))
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init2"), str(root), 1100, None), nprocs=2, join=True)
    resumed = ActivationStore(root / hp)
    assert resumed.manifest["shards"] == alone.manifest["shards"]
    assert torch.equal(resumed.load_all(), alone.load_all())
    reports = [json.loads((root / f"forwards_{r}.json").read_text()) for r in (0, 1)]
    assert all(0 not in r["shards"] and 1 not in r["shards"] for r in reports)  # not written twice


def test_corpus_shorter_than_max_tokens(tiny, tmp_path):
    model, tok = tiny
    store = collect_to_store(model, tok, docs(3), "blocks.0.hook_resid_pre", tmp_path, 10_000, batch_size=2,
                             context_length=32, shard_tokens=50, progress=False)
    total = sum(len(d.encode()) + 1 for d in docs(3))  # bytes + one BOS per 31-byte window
    total += sum((len(d.encode()) - 1) // 31 for d in docs(3))
    assert store.manifest["corpus_exhausted"] and store.num_tokens == total
    assert sorted(torch.cat([m["token_index"] for _, m in store.iter_batches(7, with_metadata=True)]).tolist()) \
        == list(range(total))


def test_overwrite_replaces_a_foreign_store(tiny, tmp_path):
    model, tok = tiny
    collect_to_store(model, tok, docs(), "blocks.0.hook_resid_post", tmp_path, 200, shard_tokens=64, progress=False)
    with pytest.raises(StoreMismatchError):
        collect_to_store(model, tok, docs(), "blocks.1.hook_resid_post", tmp_path, 100, progress=False)
    store = collect_to_store(model, tok, docs(), "blocks.1.hook_resid_post", tmp_path, 100, shard_tokens=64,
                             overwrite=True, progress=False)
    assert store.hook_point == "blocks.1.hook_resid_post" and store.num_tokens == 100
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_000000.safetensors", "shard_000001.safetensors"]


def test_a_missing_shard_is_detected(tiny, tmp_path):
    model, tok = tiny
    collect_to_store(model, tok, docs(), "blocks.0.hook_resid_post", tmp_path, 200, shard_tokens=64, progress=False)
    (tmp_path / "shard_000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard shard_000001.safetensors is missing"):
        ActivationStore(tmp_path)


def test_a_module_the_forward_never_calls_is_reported(tiny, tmp_path):
    model, tok = tiny
    model.unused = torch.nn.Linear(16, 16)
    with pytest.raises(RuntimeError, match="hook point 'unused' did not run"):
        collect_to_store(model, tok, docs(), "unused", tmp_path, 100, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_select_shards_is_a_view_of_just_those_shards(tiny, tmp_path):
    model, tok = tiny
    store = collect_to_store(model, tok, docs(), "blocks.0.hook_resid_post", tmp_path, 300, shard_tokens=64,
                             progress=False)
    assert [s["num_tokens"] for s in store.shards] == [64, 64, 64, 64, 44]
    before = (tmp_path / "manifest.json").read_bytes()
    shards = [store.read_shard(i) for i in range(5)]

    view = store.select_shards([4, 2])  # in the order given
    want = torch.cat([shards[4]["activations"], shards[2]["activations"]])
    assert torch.equal(view.load_all(), want)
    assert view.num_tokens == len(view) == view.manifest["token_count"] == 108
    assert view.shards == [store.shards[4], store.shards[2]]
    assert torch.equal(view.read_shard(1)["token_index"], shards[2]["token_index"])
    assert torch.equal(torch.cat(list(view.iter_batches(16, shuffle=False))), want)
    seen = torch.cat([m["token_index"] for _, m in view.iter_batches(10, seed=1, with_metadata=True)])
    assert sorted(seen.tolist()) == list(range(128, 192)) + list(range(256, 300))  # every token once, no others
    assert torch.equal(view.select_shards([1]).load_all(), shards[2]["activations"])  # a view's indices are its own
    assert torch.equal(store.select_shards(range(5)).load_all(), store.load_all())
    # the store and the directory are untouched
    assert store.num_tokens == 300 and len(store.shards) == 5 and (tmp_path / "manifest.json").read_bytes() == before

    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\) \(the store has 5 shards\), got \[5\]"):
        store.select_shards([0, 5])
    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\) .* got \[-1\]"):
        store.select_shards([-1])
    with pytest.raises(ValueError, match=r"indices must be in \[0, 2\) \(the store has 2 shards\), got \[2\]"):
        view.select_shards([2])
    with pytest.raises(ValueError, match=r"indices must be integers in \[0, 5\)"):
        store.select_shards([0.5])
    with pytest.raises(ValueError, match="each once"):
        store.select_shards([1, 1])
    with pytest.raises(ValueError, match="at least one shard"):
        store.select_shards([])
