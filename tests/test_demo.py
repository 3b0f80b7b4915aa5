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
