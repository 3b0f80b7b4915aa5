"""The demo end to end at a small token budget, on the real embedded model."""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from fastsae.demo import DemoSettings, run_demo, summary_table
from fastsae.io import load_sae


def dump_dom(html_path: Path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is needed to render dashboards (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", html_path.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(output_dir=str(out), max_tokens=20_000, num_epochs=4, dashboard_features=12,
                            eval_documents=16)
    return settings, run_demo(settings)


def test_demo_quality_bar(demo):
    settings, summary = demo
    saved = json.loads((Path(settings.output_dir) / "metrics.json").read_text())
    assert saved["summary"]["fvu"] == pytest.approx(summary["fvu"])
    assert summary["tokens"] >= 20_000
    assert summary["fvu"] < 0.3
    assert summary["dead_fraction"] < 0.05
    assert summary["l0"] == pytest.approx(32.0)
    assert 0.0 < summary["loss_recovered"] <= 1.0
    table = summary_table(summary)
    assert "FVU" in table and summary["dashboard"] in table


def test_demo_dashboard_renders_in_chromium(demo):
    _, summary = demo
    index = Path(summary["dashboard"])
    dom = dump_dom(index)
    assert "Feature" in dom or "feature" in dom
    pages = sorted(index.parent.glob("features/*.html"))
    assert pages, "no per-feature pages were written"
    assert dump_dom(pages[0]).count("<span") > 0  # highlighted token contexts


def test_demo_export_loads_back_and_rerun_reuses_activations(demo):
    settings, summary = demo
    sae = load_sae(summary["sae_dir"])
    exported = load_sae(summary["neuronpedia"])
    x = torch.randn(5, sae.d_in)
    torch.testing.assert_close(sae.encode(x), exported.encode(x))
    store_dir = Path(settings.output_dir) / "activations"
    shards_before = {p.name: p.stat().st_mtime_ns for p in store_dir.glob("*.safetensors")}
    from fastsae.demo import collect, load_source
    model, tokenizer, info = load_source(settings)
    collect(settings, model, tokenizer, info, summary["hook_point"])
    assert {p.name: p.stat().st_mtime_ns for p in store_dir.glob("*.safetensors")} == shards_before


def test_showcase_in_chromium_histograms_word_boundaries_and_no_dense_features(demo):
    """The default showcase as a reader sees it: no feature above the density cut, a histogram
    on every feature page, contexts that start and end on word boundaries, model and hook."""
    import re

    from fastsae.feature_viz import DENSE_CUT_QUANTILE, MIN_FIRINGS
    from fastsae.latent_cache import LatentCache
    from fastsae.store import ActivationStore

    settings, summary = demo
    store = ActivationStore(Path(settings.output_dir) / "activations")
    cache = LatentCache.from_store(load_sae(summary["sae_dir"]), store)
    counts, density = cache.counts(), cache.density()
    candidates = density[counts >= MIN_FIRINGS].double()
    cut = torch.quantile(candidates, DENSE_CUT_QUANTILE).item()
    index = Path(summary["dashboard"])
    pages = sorted(index.parent.glob("features/*.html"))
    shown = [int(p.stem) for p in pages]
    assert len(shown) == 12
    assert all(density[f] <= cut + 1e-12 for f in shown)
    assert max(density[shown]) < density.max()  # the densest features are not the showcase
    for page in pages[:3]:
        dom = dump_dom(page)
        assert '<svg class="histogram"' in dom and "<rect" in dom
        assert summary["model"] in dom and summary["hook_point"] in dom
        for ctx in re.findall(r'<div class="ctx">(.*?)</div>', dom, re.S)[:5]:
            tokens = re.findall(r'<span class="tok[^"]*"[^>]*>(.*?)</span>', ctx, re.S)
            assert tokens
            # WordPiece text as fastsae shows it: a word start carries a leading space
            first_ok = tokens[0][:1].isspace() or tokens[0].startswith("[")
            assert first_ok, tokens
