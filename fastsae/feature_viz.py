"""Feature views and a static HTML dashboard.

``feature_data`` gathers everything known about one latent from a ``LatentCache``:
max-activating contexts with per-token activations, samples from each activation quantile,
density, co-occurring latents and, for language models, the output tokens its decoder
direction promotes and suppresses (W_dec[i] @ W_U^T). ``write_dashboard`` renders an
index page (searchable, sortable list and a density histogram) and one page per feature:
plain files, no server, no external resources. Every string that reaches HTML goes
through ``html.escape``.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import torch

from fastsae.config import SAEConfig
from fastsae.files import atomic_write_json, atomic_write_text
from fastsae.latent_cache import LatentCache
from fastsae.models import BaseSAE
from fastsae.progress import progress_bar

# ----------------------------------------------------------------------------- tokens and logits

class TokenText:
    """Token id -> display string, memoised; works with nanochat and Hugging Face tokenizers.

    BPE tokens decode with their own leading space. WordPiece (BERT) tokens carry no space, so
    a word start gets one and a "##" continuation loses its marker, and contexts read as text.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.wordpiece = hasattr(tokenizer, "convert_ids_to_tokens") and any(k.startswith("##") for k in vocab)

    def _decode(self, token_id: int) -> str:
        if not self.wordpiece:
            return self.tokenizer.decode([token_id])
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return piece[2:] if piece.startswith("##") else " " + piece

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._memo:
            if token_id < 0:
                text = ""
            elif self.tokenizer is None:
                text = f"<{token_id}>"
            else:
                text = printable(self._decode(token_id))
            if len(text) > MAX_TOKEN_CHARS:
                text = text[:MAX_TOKEN_CHARS - 1] + "\u2026"
            self._memo[token_id] = text
        return self._memo[token_id]


def unembedding(model) -> torch.Tensor | None:
    """The model's unembedding W_U [vocab, d_model] (lm_head), or None for models without one."""
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) else None


def writes_to_residual(sae: BaseSAE, W_U: torch.Tensor | None) -> bool:
    """Whether the SAE's decoder directions live where W_U reads (width d_model): an SAE's or
    a transcoder's at the residual stream or a sublayer output, not at an MLP's hidden layer."""
    return W_U is not None and W_U.shape[1] == sae.d_out


def logit_effects(sae: BaseSAE, W_U: torch.Tensor, feature: int, n: int = 10) -> tuple[list, list]:
    """(promoted, suppressed): [(token id, logit change)] of the decoder direction through W_U."""
    with torch.no_grad():
        effect = W_U.float() @ sae.W_dec[feature].detach().float().to(W_U.device)
    top = torch.topk(effect, min(n, effect.numel()))
    bottom = torch.topk(-effect, min(n, effect.numel()))
    return ([(int(i), v.item()) for i, v in zip(top.indices, top.values)],
            [(int(i), -v.item()) for i, v in zip(bottom.indices, bottom.values)])


# ----------------------------------------------------------------------------- per-feature data

def context_example(cache: LatentCache, feature: int, row: int, text: TokenText,
                    before: int = 12, after: int = 8, word_slack: int = 6) -> dict:
    """One activating token with the tokens around it and the latent's value on each.

    About ``before`` tokens to the left and ``after`` to the right of the peak, widened by up to
    ``word_slack`` tokens on each side so the context starts and ends on a word boundary (a
    token beginning with whitespace, a special token or the document's edge): "precated" and
    "itera" fragments are hard to read."""
    rows = cache.context(row, before + word_slack, after + word_slack)
    focus = int((rows == row).nonzero()[0, 0])
    tokens = [text(i) for i in cache.token_ids[rows].tolist()]
    start, end = max(0, focus - before), min(len(rows) - 1, focus + after)
    while start > 0 and not _starts_word(tokens[start]):
        start -= 1
    while end + 1 < len(rows) and not _starts_word(tokens[end + 1]):
        end += 1
    rows, tokens = rows[start:end + 1], tokens[start:end + 1]
    values = cache.values_at(feature, rows)
    return {"row": int(row), "doc_id": int(cache.doc_ids[row]), "position": int(cache.positions[row]),
            "activation": values[focus - start].item(), "focus": focus - start,
            "token_ids": cache.token_ids[rows].tolist(), "tokens": tokens, "values": values.tolist()}


def _starts_word(token: str) -> bool:
    """Whether a word begins at this token: leading whitespace, or a token with no text (specials)."""
    return not token or token[0].isspace() or (token.startswith("<") and token.endswith(">"))


def feature_data(cache: LatentCache, feature: int, text: TokenText | None = None, sae: BaseSAE | None = None,
                 W_U: torch.Tensor | None = None, n_examples: int = 10, n_quantiles: int = 4, per_quantile: int = 3,
                 n_cooccurring: int = 8, n_logits: int = 10, before: int = 12, after: int = 8) -> dict:
    """Everything the dashboard and the Neuronpedia export show about one latent."""
    text = text or TokenText()
    rows, values = cache.feature(feature)
    top_rows, _ = cache.top_rows(feature, n_examples)
    data = {
        "index": feature, "count": int(rows.numel()), "density": rows.numel() / max(cache.num_tokens, 1),
        "max_activation": values.max().item() if values.numel() else 0.0,
        "mean_activation": values.mean().item() if values.numel() else 0.0,
        "examples": [context_example(cache, feature, int(r), text, before, after) for r in top_rows],
        "quantiles": [{"low": lo, "high": hi,
                       "examples": [context_example(cache, feature, int(r), text, before, after) for r in qrows]}
                      for lo, hi, qrows, _ in cache.quantile_rows(feature, n_quantiles, per_quantile)],
        "cooccurring": [{"index": j, "count": c, "fraction": f, "lift": lift}
                        for j, c, f, lift in cache.cooccurrence(feature, n_cooccurring)],
        "histogram": activation_histogram(values),
        "top_logits": [], "bottom_logits": [],
    }
    if sae is not None and writes_to_residual(sae, W_U):
        promoted, suppressed = logit_effects(sae, W_U, feature, n_logits)
        data["top_logits"] = [{"token_id": i, "token": text(i), "value": v} for i, v in promoted]
        data["bottom_logits"] = [{"token_id": i, "token": text(i), "value": v} for i, v in suppressed]
    return data


# ----------------------------------------------------------------------------- which features to show

SHOWCASE_MODES = ("spread", "sparse", "dense", "all")
DENSE_CUT_QUANTILE = 0.95  # "spread" and "sparse" skip the densest 5% of live features
SHOWCASE_BANDS = 4  # log-density bands "spread" draws from
MIN_FIRINGS = 5  # a feature needs this many firings to show a few examples
READABILITY_EXAMPLES = 20


def readability(cache: LatentCache, feature: int, n: int = READABILITY_EXAMPLES) -> float:
    """How quickly a reader can name the feature from its strongest activations, in [0, 1].

    The product of two shares over its top ``n`` activations: how concentrated they are on few
    distinct tokens (1 - normalised entropy of the peak tokens: a feature that peaks on "must"
    or on digit literals reads at a glance) and how many different documents they come from
    (a pattern seen across the text, not one document's quirk)."""
    rows, _ = cache.top_rows(feature, n)
    if rows.numel() < 2:
        return 0.0
    _, counts = torch.unique(cache.token_ids[rows], return_counts=True)
    p = counts.double() / rows.numel()
    concentration = 1.0 - float(-(p * p.log()).sum()) / math.log(rows.numel())
    documents = torch.unique(cache.doc_ids[rows]).numel() / rows.numel()
    return concentration * documents


def showcase_features(cache: LatentCache, n: int, mode: str = "spread") -> list[int]:
    """The features to put in front of a reader.

    * ``dense``: the most frequent first (they fire on 10-40% of tokens and are the least
      readable: punctuation, whole contexts);
    * ``sparse``: below the median density, most readable first;
    * ``spread`` (default): the live features below the densest 5%, split into SHOWCASE_BANDS
      equal bands of log density, about n / bands from each, most readable first;
    * ``all``: every live feature (n is ignored).
    """
    if mode not in SHOWCASE_MODES:
        raise ValueError(f"features must be one of {SHOWCASE_MODES}, got {mode!r}")
    counts = cache.counts()
    live = torch.nonzero(counts > 0).flatten()
    if mode == "all":
        return live.tolist()
    if mode == "dense":
        order = torch.sort(counts, descending=True, stable=True).indices
        return order[counts[order] > 0][:n].tolist()
    density = cache.density()
    candidates = live[counts[live] >= MIN_FIRINGS]
    if candidates.numel() == 0:
        return []
    cut = torch.quantile(density[candidates].double(), DENSE_CUT_QUANTILE if mode == "spread" else 0.5)
    candidates = candidates[density[candidates] <= cut]
    if mode == "sparse":
        return _most_readable(cache, candidates.tolist(), n)
    log_density = density[candidates].double().log10()
    edges = torch.linspace(float(log_density.min()), float(log_density.max()) + 1e-9, SHOWCASE_BANDS + 1)
    bands = [candidates[(log_density >= lo) & (log_density < hi)].tolist() for lo, hi in zip(edges, edges[1:])]
    chosen, left = [], n
    for i, band in enumerate(bands):  # a band with too few features leaves its share to the next
        share = math.ceil(left / (len(bands) - i))
        picked = _most_readable(cache, band, share)
        chosen += picked
        left -= len(picked)
    return chosen


def _most_readable(cache: LatentCache, features: list[int], n: int) -> list[int]:
    scores = {f: readability(cache, f) for f in features}
    return sorted(features, key=lambda f: (-scores[f], f))[:n]


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}
th{cursor:pointer;background:#f4f4f4;user-select:none}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:4px 0;padding:4px;border:1px solid #eee}
.tok{border-radius:2px}.focus{outline:1px solid #c40;font-weight:bold}
.act{color:#888;font-size:85%;margin-right:8px}.meta{color:#555}
.logits span{display:inline-block;margin:2px 6px 2px 0;font-family:ui-monospace,monospace}
input{padding:6px;width:320px;margin:8px 0}
"""

_INDEX_JS = """
const table = document.getElementById('features');
const body = table.tBodies[0];
const search = document.getElementById('search');
function filter() {
  const q = search.value.toLowerCase();
  for (const row of body.rows) row.hidden = !row.textContent.toLowerCase().includes(q);
}
search.addEventListener('input', filter);
// index.html#q=TEXT opens with that search applied, so a filtered list can be linked to; a
// malformed escape (#q=%E0%A4%A) is searched for as written instead of stopping the script.
function hashQuery(raw) { try { return decodeURIComponent(raw); } catch (e) { return raw; } }
if (location.hash.startsWith('#q=')) { search.value = hashQuery(location.hash.slice(3)); filter(); }
table.tHead.querySelectorAll('th').forEach((th, col) => {
  let ascending = false;
  th.addEventListener('click', () => {
    ascending = !ascending;
    const numeric = th.dataset.type === 'num';
    const key = r => numeric ? parseFloat(r.cells[col].dataset.value) : r.cells[col].textContent;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
    });
    rows.forEach(r => body.appendChild(r));
  });
});
"""


_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_TOKEN_CHARS = 40  # longer tokens (runs of spaces or symbols in code) are cut with an ellipsis


def printable(text: str) -> str:
    """``text`` with each lone surrogate (which no UTF-8 file can hold) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def esc(value) -> str:
    return html.escape(printable(str(value)), quote=True)


def _shown(token: str) -> str:
    """Make whitespace visible, so a newline token does not vanish or break the line."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}{js}</body></html>\n")


def render_context(example: dict, max_activation: float) -> str:
    """Tokens with background intensity proportional to the activation; the value on hover."""
    spans = []
    for j, (token, value) in enumerate(zip(example["tokens"], example["values"])):
        alpha = min(max(value / max_activation, 0.0), 1.0) if max_activation > 0 else 0.0
        cls = "tok focus" if j == example["focus"] else "tok"
        spans.append(f'<span class="{cls}" style="background-color:rgba(255,127,14,{alpha:.3f})" '
                     f'title="{esc(repr(token))}: {value:.4g}">{esc(_shown(token))}</span>')
    return (f'<div class="ctx"><span class="act">{example["activation"]:.4g}</span>'
            f'{"".join(spans)}</div>')


def _logits_html(title: str, items: list) -> str:
    if not items:
        return ""
    spans = "".join(f'<span title="{item["value"]:.4g}">{esc(repr(item["token"]))} '
                    f'{item["value"]:+.3f}</span>' for item in items)
    return f'<h3>{esc(title)}</h3><div class="logits">{spans}</div>'


HISTOGRAM_BINS = 24


def activation_histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of the latent's non-zero activations in equal bins from 0 to its maximum."""
    top = values.max().item() if values.numel() else 0.0
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=top) if top > 0 else torch.zeros(bins)
    return {"max": top, "counts": [int(c) for c in counts.tolist()]}


_SVG_PAD = 20  # room for the axis labels at both ends of a bar chart


def _svg_bars(counts: list, titles: list[str], width: int, height: int, fill: str) -> str:
    """SVG <rect> bars for ``counts`` between the side pads, scaled to the tallest, each with
    a hover title; 20 px at the bottom are left for the axis labels."""
    tallest, bar_w, room = max(max(counts), 1), (width - 2 * _SVG_PAD) / len(counts), height - 30
    return "".join(
        f'<rect x="{_SVG_PAD + i * bar_w:.1f}" y="{height - 20 - c / tallest * room:.1f}" width="{bar_w - 1:.1f}" '
        f'height="{c / tallest * room:.1f}" fill="{fill}"><title>{esc(t)}</title></rect>'
        for i, (c, t) in enumerate(zip(counts, titles)))


def histogram_svg(histogram: dict, width: int = 480, height: int = 120) -> str:
    """Inline SVG bars of an activation histogram (no script, no external resource)."""
    counts, top = histogram["counts"], histogram["max"]
    if not any(counts):
        return ""
    step = top / len(counts)
    bars = _svg_bars(counts, [f"{c} tokens in [{i * step:.3g}, {(i + 1) * step:.3g})" for i, c in enumerate(counts)],
                     width, height, "#e07b39")
    axis = (f'<text x="20" y="{height - 4}" font-size="10">0</text>'
            f'<text x="{width - 20}" y="{height - 4}" font-size="10" text-anchor="end">{top:.3g}</text>')
    return (f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{bars}{axis}</svg>')


def render_feature_page(data: dict, title: str = "", link_features: set | None = None) -> str:
    """One feature's page. Co-occurring latents link to their pages when in ``link_features``."""
    f, mx = data["index"], data["max_activation"]
    stats = (f'<table><tr><th>density</th><td>{data["density"]:.4%} ({data["count"]} tokens)</td></tr>'
             f'<tr><th>max activation</th><td>{mx:.4g}</td></tr>'
             f'<tr><th>mean activation (when active)</th><td>{data["mean_activation"]:.4g}</td></tr></table>')
    cooc = "".join(
        f'<li>{_feature_link(c["index"], link_features)}: {c["lift"]:.1f}x chance, {c["count"]} tokens '
        f'together ({c["fraction"]:.1%} of this feature\'s)</li>' for c in data["cooccurring"])
    histogram = histogram_svg(data["histogram"]) if data.get("histogram") else ""
    parts = [f'<p><a href="../index.html">&larr; all features</a></p><h1>Feature {f}</h1>',
             f'<p class="meta">{esc(title)}</p>', stats,
             f"<h3>Activation histogram (when active)</h3>{histogram}" if histogram else "",
             _logits_html("Promoted output tokens", data["top_logits"]),
             _logits_html("Suppressed output tokens", data["bottom_logits"]),
             "<h2>Top activations</h2>" + ("".join(render_context(e, mx) for e in data["examples"])
                                           or "<p>never active in these tokens</p>")]
    for band in reversed(data["quantiles"]):
        parts.append(f'<h3>Activations in [{band["low"]:.3g}, {band["high"]:.3g}]</h3>'
                     + "".join(render_context(e, mx) for e in band["examples"]))
    if cooc:
        parts.append(f"<h2>Features that fire with it (by lift)</h2><ul>{cooc}</ul>")
    return _page(f"Feature {f}", "".join(parts))


def _feature_link(index: int, link_features: set | None) -> str:
    if link_features is not None and index in link_features:
        return f'<a href="{index}.html">feature {index}</a>'
    return f"feature {index}"


def density_svg(density: torch.Tensor, num_tokens: int, bins: int = 30, width: int = 600, height: int = 160) -> str:
    """Inline SVG histogram of log10 feature density (live latents), with the dead count."""
    live = density[density > 0].double()
    dead = int((density == 0).sum())
    low = min(math.floor(math.log10(1.0 / max(num_tokens, 1))), -1)
    counts = torch.histc(live.log10().float(), bins=bins, min=low, max=0) if live.numel() else torch.zeros(bins)
    counts = counts.tolist()
    bars = _svg_bars(counts, [f"{int(c)} features" for c in counts], width, height, "#4a7ab5")
    pad = _SVG_PAD
    axis = "".join(f'<text x="{pad + (e - low) / -low * (width - 2 * pad):.1f}" y="{height - 4}" font-size="10" '
                   f'text-anchor="middle">1e{e}</text>' for e in range(low, 1))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="feature density histogram">{bars}{axis}</svg>'
            f'<p class="meta">log10 feature density over {num_tokens} tokens; {dead} dead latents not shown</p>')


def render_index(rows: list[dict], title: str, summary: dict, histogram: str) -> str:
    """The index page: summary, density histogram, and a searchable, sortable feature table."""
    summary_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in summary.items())
    body_rows = "".join(
        f'<tr><td data-value="{r["index"]}"><a href="features/{r["index"]}.html">{r["index"]}</a></td>'
        f'<td data-value="{r["density"]:.6g}">{r["density"]:.4%}</td>'
        f'<td data-value="{r["max_activation"]:.6g}">{r["max_activation"]:.4g}</td>'
        f'<td>{esc(" | ".join(_shown(t) for t in r["top_tokens"]))}</td></tr>' for r in rows)
    body = (f"<h1>{esc(title)}</h1><table>{summary_rows}</table><h2>Feature density</h2>{histogram}"
            f'<h2>Features</h2><input id="search" type="search" placeholder="search features and tokens">'
            '<table id="features"><thead><tr><th data-type="num">feature</th><th data-type="num">density</th>'
            '<th data-type="num">max activation</th><th>top tokens</th></tr></thead>'
            f"<tbody>{body_rows}</tbody></table>")
    return _page(title, body, _INDEX_JS)


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def index_row(data: dict) -> dict:
    tokens = []
    for e in data["examples"]:
        token = e["tokens"][e["focus"]]
        if token not in tokens:
            tokens.append(token)
    return {"index": data["index"], "density": data["density"], "max_activation": data["max_activation"],
            "top_tokens": tokens[:5]}


def write_dashboard(cache: LatentCache, output_dir: str | Path, sae: BaseSAE | None = None, tokenizer=None,
                    W_U: torch.Tensor | None = None, features: list[int] | None = None, title: str | None = None,
                    summary: dict | None = None, progress: bool = False, model_name: str | None = None,
                    **data_kwargs) -> Path:
    """Write index.html and features/{i}.html under ``output_dir``; returns the index path.

    ``features`` defaults to every latent that fires at least once in the cache. Every page
    names the model (``model_name``) and the SAE's hook point.
    """
    output_dir = Path(output_dir)
    if features is None:
        features = torch.nonzero(cache.counts()).flatten().tolist()
    text = TokenText(tokenizer)
    if title is None:
        where = sae.config.hook_point if sae is not None else "SAE"
        if sae is not None and sae.config.is_transcoder:
            where = f"{where} \u2192 {sae.config.output_hook_point}"
        title = f"{model_name} · {where}" if model_name else f"SAE features at {where}"
    linked = set(features)
    rows = []
    for f in progress_bar(features, desc="feature pages", unit="feature", disable=not progress):
        data = feature_data(cache, f, text, sae, W_U, **data_kwargs)
        atomic_write_text(output_dir / "features" / f"{f}.html", render_feature_page(data, title, linked))
        rows.append(index_row(data))
    info = {**({"model": model_name} if model_name else {}), "tokens": cache.num_tokens, "latents": cache.d_sae,
            "features shown": len(features),
            "dead latents": int((cache.counts() == 0).sum())}
    if sae is not None:
        info.update({"hook point": sae.config.hook_point, "d_in": sae.d_in, "activation": sae.config.activation})
        if sae.config.is_transcoder:
            info.update({"architecture": sae.config.architecture, "output hook point": sae.config.output_hook_point,
                         "d_out": sae.d_out})
    info.update(summary or {})
    page = render_index(rows, title, info, density_svg(cache.density(), cache.num_tokens))
    return atomic_write_text(output_dir / "index.html", page)


# ----------------------------------------------------------------------------- the seed API

class FeatureVisualizer:
    """Seed-compatible feature views. ``activations`` may be an [N, d_in] tensor (``tokens``
    then gives the token id of each row, and rows are taken to be consecutive text) or a
    ``LatentCache`` (which carries its own token ids, documents and positions)."""

    def __init__(self, sae: BaseSAE, config: SAEConfig | None = None, tokenizer=None, model=None):
        self.sae = sae
        self.config = config or sae.config
        self.tokenizer = tokenizer
        self.text = TokenText(tokenizer)
        self.W_U = unembedding(model) if model is not None else None
        self._memo: tuple | None = None

    def cache(self, activations, tokens: torch.Tensor | None = None) -> LatentCache:
        """The latent cache for these activations, built once and reused across calls."""
        if isinstance(activations, LatentCache):
            return activations
        key = (id(activations), activations.shape, id(tokens))
        if self._memo is None or self._memo[0] != key:
            tok = None if tokens is None else tokens.reshape(-1)
            self._memo = (key, LatentCache.from_activations(self.sae, activations.reshape(-1, self.sae.d_in), tok))
        return self._memo[1]

    def get_top_features(self, activations, k: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature indices, activation frequencies) of the k most frequently active latents."""
        density = self.cache(activations).density().float()
        top = torch.topk(density, min(k, density.numel()))
        return top.indices, top.values

    def get_feature_statistics(self, feature_idx: int, activations) -> dict:
        cache = self.cache(activations)
        _, values = cache.feature(feature_idx)
        n = max(cache.num_tokens, 1)
        total, sq = values.double().sum().item(), values.double().pow(2).sum().item()
        mean = total / n
        quant = (torch.quantile(values, torch.tensor([0.75, 0.95])).tolist() if values.numel() else [0.0, 0.0])
        return {"feature_idx": feature_idx, "activation_frequency": values.numel() / n, "mean_activation": mean,
                "mean_when_active": values.mean().item() if values.numel() else 0.0,
                "max_activation": values.max().item() if values.numel() else 0.0,
                "std_activation": math.sqrt(max(sq / n - mean ** 2, 0.0) * n / max(n - 1, 1)),
                "percentile_75": quant[0], "percentile_95": quant[1]}

    def get_max_activating_examples(self, feature_idx: int, activations, tokens: torch.Tensor | None = None,
                                    k: int = 10) -> list[dict]:
        cache = self.cache(activations, tokens)
        rows, _ = cache.top_rows(feature_idx, k)
        out = []
        for rank, row in enumerate(rows.tolist(), 1):
            example = context_example(cache, feature_idx, row, self.text)
            token_id = int(cache.token_ids[row])
            out.append({"rank": rank, "activation": example["activation"], "sample_idx": row,
                        **({"token_id": token_id, "token_str": self.text(token_id)} if token_id >= 0 else {}),
                        "context": example})
        return out

    def _data(self, feature_idx, activations, tokens=None) -> dict:
        return feature_data(self.cache(activations, tokens), feature_idx, self.text, self.sae, self.W_U)

    def generate_feature_report(self, feature_idx: int, activations, tokens: torch.Tensor | None = None,
                                save_path: str | Path | None = None) -> dict:
        report = {"feature_idx": feature_idx, "hook_point": self.config.hook_point,
                  "statistics": self.get_feature_statistics(feature_idx, self.cache(activations, tokens)),
                  "max_activating_examples": self.get_max_activating_examples(feature_idx, activations, tokens, 20),
                  "feature": self._data(feature_idx, activations, tokens)}
        if save_path is not None:
            atomic_write_json(save_path, report)
        return report

    def visualize_feature_dashboard(self, feature_idx: int, activations, tokens: torch.Tensor | None = None) -> str:
        """A self-contained HTML page for one feature."""
        return render_feature_page(self._data(feature_idx, activations, tokens),
                                   f"SAE at {self.config.hook_point}")

    def save_feature_dashboard(self, feature_idx: int, activations, save_path: str | Path,
                               tokens: torch.Tensor | None = None) -> Path:
        return atomic_write_text(save_path, self.visualize_feature_dashboard(feature_idx, activations, tokens))

    def save_dashboard(self, activations, output_dir: str | Path, tokens: torch.Tensor | None = None,
                       features: list[int] | None = None, summary: dict | None = None) -> Path:
        """The whole site (index + one page per feature); returns the index path."""
        return write_dashboard(self.cache(activations, tokens), output_dir, self.sae, self.tokenizer, self.W_U,
                               features, summary=summary)


def generate_sae_summary(sae: BaseSAE, config: SAEConfig | None, activations: torch.Tensor,
                         save_path: str | Path | None = None) -> dict:
    """Metrics and the most frequent features of an SAE on ``activations``; JSON at ``save_path``."""
    from fastsae.evaluator import SAEEvaluator

    config = config or sae.config
    viz = FeatureVisualizer(sae, config)
    cache = viz.cache(activations)
    indices, freqs = viz.get_top_features(cache, k=20)
    summary = {"hook_point": config.hook_point, "d_in": config.d_in, "d_sae": config.d_sae,
               "activation_type": config.activation, "expansion_factor": config.d_sae / config.d_in,
               "metrics": SAEEvaluator(sae, config).evaluate(activations).to_dict(),
               "top_features": [{"feature_idx": int(i), "activation_frequency": f.item(),
                                 "mean_when_active": viz.get_feature_statistics(int(i), cache)["mean_when_active"]}
                                for i, f in zip(indices, freqs)]}
    if save_path is not None:
        atomic_write_json(save_path, json.loads(json.dumps(summary, default=float)))
    return summary
