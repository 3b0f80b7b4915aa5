"""Latent cache, per-feature views and the HTML they render (escaping included)."""
import json
import re

import pytest
import torch
from torch import nn

from fastsae.config import SAEConfig
from fastsae.feature_viz import FeatureVisualizer, TokenText, feature_data, generate_sae_summary, write_dashboard
from fastsae.latent_cache import LatentCache, collect_activations
from fastsae.models import create_sae

SCRIPT = "<script>alert(1)</script>"
TEXTS = ["the cat sat on the mat", f"a token {SCRIPT} in the corpus", "the dog ran after the cat",
         "we print(x) & y \"quoted\" here", "the mat was red"]
HOOK = "blocks.0.hook_resid_post"


class WordTokenizer:
    """A whitespace tokenizer with nanochat's interface (bos id, encode, decode)."""

    def __init__(self, texts):
        self.vocab = ["<bos>"] + sorted({w for t in texts for w in t.split()})
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None, append=None):
        return [self.ids[w] for w in text.split()]

    def decode(self, ids):
        return "".join(" " + self.vocab[i] for i in ids)


class Passthrough(nn.Module):
    def forward(self, x):
        return x


class WordLM(nn.Module):
    """Embedding -> one pass-through block -> lm_head. Coordinate 0 of the embedding is large
    only for the script token; the unembedding reads coordinate 0 into the token "cat"."""

    def __init__(self, tokenizer, d=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(len(tokenizer.vocab), d),
                                          "h": nn.ModuleList([Passthrough()])})
        self.lm_head = nn.Linear(d, len(tokenizer.vocab), bias=False)
        with torch.no_grad():
            self.transformer.wte.weight.copy_(torch.randn(len(tokenizer.vocab), d, generator=g) * 0.3)
            self.transformer.wte.weight[:, 0] = -0.5
            self.transformer.wte.weight[tokenizer.ids[SCRIPT], 0] = 5.0
            self.transformer.wte.weight[tokenizer.ids["mat"], 0] = 2.0
            self.lm_head.weight.copy_(torch.randn(len(tokenizer.vocab), d, generator=g) * 0.1)
            self.lm_head.weight[tokenizer.ids["cat"], 0] = 3.0
            self.lm_head.weight[tokenizer.ids["dog"], 0] = -3.0

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(x)


def identity_sae(d=8):
    cfg = SAEConfig(d_in=d, d_sae=2 * d, activation="relu", dtype="float32", hook_point=HOOK)
    sae = create_sae(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.enc_weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def word_setup():
    tok = WordTokenizer(TEXTS)
    return tok, WordLM(tok).eval(), identity_sae()


def test_cache_from_model_keeps_tokens_docs_positions():
    tok, model, sae = word_setup()
    cache = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    n = sum(len(t.split()) + 1 for t in TEXTS)  # each document gets a BOS in front
    assert cache.num_tokens == n
    assert cache.token_ids[:7].tolist() == [0] + [tok.ids[w] for w in TEXTS[0].split()]
    assert cache.doc_ids.unique().tolist() == list(range(len(TEXTS)))
    assert cache.positions[:7].tolist() == list(range(7))
    script_row = int((cache.token_ids == tok.ids[SCRIPT]).nonzero()[0, 0])
    rows, values = cache.top_rows(0, 3)
    assert rows[0] == script_row and values[0] == pytest.approx(5.0)
    # the context stays within the document
    ctx = cache.context(script_row, before=20, after=20)
    assert (cache.doc_ids[ctx] == cache.doc_ids[script_row]).all()
    assert ctx.numel() == len(TEXTS[1].split()) + 1


def test_cache_matches_dense_codes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=6, d_sae=24, activation="topk", k=3, dtype="float32")).eval()
    x = torch.randn(150, 6)
    docs = torch.arange(150) // 50
    pos = torch.arange(150) % 50
    cache = LatentCache.from_activations(sae, x, torch.arange(150), docs, pos, batch_size=32)
    dense = sae.encode(x)
    assert cache.num_tokens == 150
    for f in range(24):
        rows, values = cache.feature(f)
        expected_rows = dense[:, f].nonzero().flatten()
        assert torch.equal(rows, expected_rows) and torch.equal(values, dense[expected_rows, f])
        assert torch.equal(cache.values_at(f, torch.arange(150)), dense[:, f])
    assert torch.allclose(cache.density(), (dense > 0).double().mean(0))
    assert torch.equal(cache.max_activations(), dense.max(0).values)
    active = (dense > 0).long()
    together = active.t() @ active
    f = int(active.sum(0).argmax())
    cooc = cache.cooccurrence(f, n=5, min_together=2)
    counts = active.sum(0).double()
    lift = torch.where(together[f] >= 2, (together[f] / counts[f]) / (counts / 150), 0.0)
    lift[f] = 0
    expected = torch.topk(lift, 5)
    assert [v for *_, v in cooc] == pytest.approx(expected.values[expected.values > 0].tolist())
    for j, c, fraction, value in cooc:
        assert together[f, j] == c and fraction == pytest.approx(c / counts[f].item())
        assert value == pytest.approx(lift[j].item())
    # contexts never cross a document boundary
    assert cache.context(50, before=5, after=2).tolist() == [50, 51, 52]
    assert cache.context(49, before=2, after=5).tolist() == [47, 48, 49]
    bands = cache.quantile_rows(f, n_bins=4, per_bin=2)
    assert len(bands) == 4 and all(lo <= hi for lo, hi, _, _ in bands)
    assert [b[0] for b in bands] == sorted(b[0] for b in bands)
    loaded = LatentCache.load(cache.save(tmp_path / "cache.safetensors"))
    for name in ("values", "indices", "row_offsets", "token_ids", "doc_ids", "positions"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
    assert loaded.d_sae == 24


def test_cache_from_store_equals_cache_from_model(tmp_path):
    from fastsae.store import ActivationStore, collect_to_store

    tok, model, sae = word_setup()
    collect_to_store(model, tok, TEXTS, HOOK, tmp_path / "store", max_tokens=1000, shard_tokens=7, progress=False)
    from_store = LatentCache.from_store(sae, ActivationStore(tmp_path / "store"))
    direct = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    for name in ("values", "indices", "row_offsets", "token_ids", "doc_ids", "positions"):
        assert torch.equal(getattr(from_store, name), getattr(direct, name)), name


def test_feature_data_contexts_logits_and_quantiles():
    tok, model, sae = word_setup()
    cache = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    data = feature_data(cache, 0, TokenText(tok), sae, model.lm_head.weight, n_examples=3)
    top = data["examples"][0]
    assert top["tokens"][top["focus"]] == " " + SCRIPT
    assert top["activation"] == pytest.approx(5.0) and top["values"][top["focus"]] == pytest.approx(5.0)
    assert " ".join(t.strip() for t in top["tokens"]) == "<bos> " + TEXTS[1]
    assert data["examples"][1]["tokens"][data["examples"][1]["focus"]] == " mat"
    assert data["count"] == 1 + 2  # the script token and two "mat"s
    assert data["density"] == pytest.approx(3 / cache.num_tokens)
    assert data["top_logits"][0]["token"] == " cat" and data["bottom_logits"][0]["token"] == " dog"
    assert data["top_logits"][0]["value"] == pytest.approx(3.0)
    assert data["quantiles"][-1]["examples"][0]["activation"] == pytest.approx(5.0)
    json.dumps(data)  # plain JSON all the way down


def test_html_escapes_every_token(tmp_path):
    tok, model, sae = word_setup()
    cache = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    index = write_dashboard(cache, tmp_path, sae, tok, model.lm_head.weight)
    pages = {p.name: p.read_text() for p in (tmp_path / "features").iterdir()}
    assert set(pages) == {f"{i}.html" for i in torch.nonzero(cache.counts()).flatten().tolist()}
    page = pages["0.html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert '"quoted"' not in "".join(pages.values()) and "&quot;quoted&quot;" in "".join(pages.values())
    assert "> &amp;</span>" in "".join(pages.values())
    text = index.read_text()
    assert len(re.findall("<script", text, re.I)) == 1  # only the page's own sorting/search code
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'href="features/0.html"' in text and "<svg" in text


def test_seed_feature_visualizer_api(tmp_path):
    tok, model, sae = word_setup()
    acts, meta = collect_activations(model, tok, TEXTS, HOOK, 1000)
    viz = FeatureVisualizer(sae, sae.config, tokenizer=tok)
    dense = sae.encode(acts)
    indices, freqs = viz.get_top_features(acts, k=4)
    assert torch.allclose(freqs, (dense > 0).float().mean(0)[indices])
    assert freqs.tolist() == sorted(freqs.tolist(), reverse=True)
    stats = viz.get_feature_statistics(0, acts)
    col = dense[:, 0]
    assert stats["activation_frequency"] == pytest.approx((col > 0).float().mean().item())
    assert stats["mean_activation"] == pytest.approx(col.mean().item())
    assert stats["std_activation"] == pytest.approx(col.std().item(), rel=1e-5)
    assert stats["max_activation"] == pytest.approx(5.0)
    examples = viz.get_max_activating_examples(0, acts, tokens=meta["token_ids"], k=2)
    assert examples[0]["rank"] == 1 and examples[0]["token_str"] == " " + SCRIPT
    assert examples[0]["sample_idx"] == int(col.argmax())
    report = viz.generate_feature_report(0, acts, meta["token_ids"], save_path=tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["feature_idx"] == 0
    assert report["statistics"]["max_activation"] == pytest.approx(5.0)
    page = viz.visualize_feature_dashboard(0, acts, meta["token_ids"])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page.lower()
    viz.save_feature_dashboard(0, acts, tmp_path / "f0.html", meta["token_ids"])
    assert (tmp_path / "f0.html").read_text() == page
    summary = generate_sae_summary(sae, sae.config, acts, save_path=tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["d_sae"] == 16 and saved["metrics"]["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert summary["top_features"][0]["activation_frequency"] == pytest.approx(freqs[0].item())


class PieceTokenizer:
    """Decodes ids to word pieces: a leading space starts a word, no space continues one."""

    pieces = [" the", " de", "pre", "cated", " function", " is", " gone", "<bos>"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_contexts_start_and_end_on_word_boundaries():
    from fastsae.feature_viz import context_example

    sae = identity_sae(d=8)
    ids = torch.tensor([7, 0, 1, 2, 3, 4, 5, 6])  # <bos> the de|pre|cated function is gone
    acts = torch.zeros(8, 8)
    acts[3, 0] = 1.0  # the feature peaks on "pre", inside "deprecated"
    cache = LatentCache.from_activations(sae, acts, token_ids=ids, doc_ids=torch.zeros(8, dtype=torch.long),
                                         positions=torch.arange(8))
    text = TokenText(PieceTokenizer())
    example = context_example(cache, 0, 3, text, before=0, after=0)
    assert "".join(example["tokens"]) == " deprecated"  # widened both ways to whole words
    assert example["tokens"][example["focus"]] == "pre" and example["activation"] == pytest.approx(1.0)
    wide = context_example(cache, 0, 3, text, before=1, after=1)
    assert "".join(wide["tokens"]) == " deprecated"  # " de" and "cated" were already in reach
    wider = context_example(cache, 0, 3, text, before=3, after=2)
    assert "".join(wider["tokens"]) == "<bos> the deprecated function"
