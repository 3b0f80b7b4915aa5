"""The dashboard as a browser sees it: headless Chromium renders the pages, runs their script,
and dumps the resulting DOM."""
import re
import shutil
import subprocess

import pytest
from test_feature_viz import SCRIPT, TEXTS, word_setup

from fastsae.feature_viz import write_dashboard
from fastsae.latent_cache import LatentCache

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")


def dump_dom(url: str, profile) -> tuple[str, str]:
    """(DOM after scripts ran, browser log)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    tok, model, sae = word_setup()
    cache = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    write_dashboard(cache, root / "site", sae, tok, model.lm_head.weight)
    return root


def test_index_lists_every_feature_and_runs_its_script(site):
    dom, log = dump_dom((site / "site" / "index.html").as_uri(), site / "profile-index")
    pages = sorted(p.stem for p in (site / "site" / "features").glob("*.html"))
    linked = sorted(re.findall(r'href="features/(\d+)\.html"', dom))
    assert linked == pages and len(pages) >= 8
    assert "<svg" in dom
    assert "Uncaught" not in log  # no script error in the page


def test_index_search_from_url_hides_non_matching_rows(site):
    dom, _ = dump_dom((site / "site" / "index.html").as_uri() + "#q=alert", site / "profile-search")
    rows = re.findall(r"<tr( hidden=\"\")?>(<td data-value=.*?)</tr>", dom, re.S)
    shown = [bool(hidden) is False for hidden, _ in rows]
    matching = ["alert" in re.sub(r"<[^>]+>", "", cells) for _, cells in rows]
    assert shown == matching
    assert any(matching) and not all(matching)


def test_feature_page_shows_top_context_and_script_token_as_text(site):
    dom, _ = dump_dom((site / "site" / "features" / "0.html").as_uri(), site / "profile-feature")
    contexts = re.findall(r'<div class="ctx">(.*?)</div>', dom, re.S)
    assert contexts, "no context rendered"
    top = re.sub(r"<[^>]+>", "", contexts[0])  # the text a reader sees
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in top
    assert "a token" in top and "in the corpus" in top
    # the token is text, not an element: no script element anywhere in the rendered page
    assert not re.search(r"<script", dom, re.I)
    assert SCRIPT not in dom
    assert re.search(r'class="tok focus"[^>]*>\s*&lt;script&gt;alert\(1\)&lt;/script&gt;</span>', dom)


class OddTokenizer:
    """Decodes "SURR" to a lone surrogate, as byte-level tokenizers can for a split character."""

    def __init__(self, inner):
        self.inner = inner

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None, append=None):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids).replace("SURR", "\udcff")


def test_odd_tokens_and_a_malformed_search_link(tmp_path):
    from test_feature_viz import WordLM, WordTokenizer, identity_sae

    texts = [*TEXTS, f"a {'y' * 300} SURR b", "SURR the cat"]
    words = WordTokenizer(texts)
    cache = LatentCache.from_model(identity_sae(), WordLM(words).eval(), words, texts, max_tokens=1000)
    index = write_dashboard(cache, tmp_path / "site", identity_sae(), OddTokenizer(words))
    pages = [index, *(tmp_path / "site" / "features").glob("*.html")]
    for page in pages:
        text = page.read_bytes().decode("utf-8")  # a lone surrogate would have stopped the write
        assert "y" * 40 not in text  # the 300-character token is cut
    assert any("\ufffd" in p.read_text(encoding="utf-8") for p in pages)

    # A malformed escape in the link's search text: searched for as written, the script goes on.
    dom, log = dump_dom(index.as_uri() + "#q=%E0%A4%A", tmp_path / "profile")
    assert "Uncaught" not in log
    rows = re.findall(r"<tr( hidden=\"\")?>(<td data-value=)", dom)
    assert rows and all(hidden for hidden, _ in rows)  # nothing matches "%E0%A4%A": the filter ran
