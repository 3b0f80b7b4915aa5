"""Text corpora for activation collection.

A corpus is a named, re-iterable sequence of documents (strings) in a fixed order. The order
matters: a collection that is interrupted and resumed replays the corpus from the start and
skips what is already stored, so the same corpus must yield the same documents every time.

The default corpus is text that ships with Python itself, so collection works offline with no
download: the documentation topics behind `help()` (pydoc_data.topics) followed by the
docstrings of the standard library, read from source with `ast` (importing every stdlib module
would run code with side effects).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from fastsae.hooks import TokenBatch

__all__ = ["Corpus", "default_corpus", "iter_token_batches", "iter_token_chunks", "load_text_corpus",
           "python_doc_topics", "stdlib_docstrings"]


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable corpus: each iteration calls `documents()` afresh, in the same order.

    `fingerprint` identifies the content (recorded in an activation store's manifest so a resume
    can check it replays the same text).
    """

    name: str
    documents: Callable[[], Iterable[str]]
    fingerprint: str

    def __iter__(self) -> Iterator[str]:
        for text in self.documents():
            text = text.strip()
            if text:  # whitespace-only documents would become empty sequences
                yield text

    def require_nonempty(self) -> "Corpus":
        """Raise a clear error if the corpus yields no document at all."""
        if next(iter(self), None) is None:
            raise ValueError(f"corpus {self.name!r} is empty: it yields no non-blank document")
        return self


def python_doc_topics() -> Iterator[str]:
    """The CPython documentation topics (the text `help('topic')` shows), sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _stdlib_source_files() -> Iterator[Path]:
    """Source files of top-level stdlib modules and packages, in sorted module-name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        for candidate in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if candidate.is_file():
                yield candidate
                break


def _docstrings_of(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            yield doc


def stdlib_docstrings() -> Iterator[str]:
    """Standard-library docstrings, read from source without importing anything."""
    for path in _stdlib_source_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield from _docstrings_of(source)


def _python_docs() -> Iterator[str]:
    yield from python_doc_topics()
    yield from stdlib_docstrings()


def default_corpus() -> Corpus:
    """Python's own documentation: pydoc topics, then stdlib docstrings. Deterministic order."""
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(name=f"python-docs-{version}", documents=_python_docs, fingerprint=f"python-docs-{version}")


def _check_text_file(path: Path) -> None:
    """A one-line error naming the file if its first MiB is not UTF-8 text (a binary file)."""
    import codecs

    with path.open("rb") as fh:
        head = fh.read(1 << 20)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text (byte {e.start}: {head[e.start:e.start + 1]!r})") \
            from None
    if b"\x00" in head:
        raise ValueError(f"corpus file {path} is not text: it contains NUL bytes")


def _read_txt(path: Path, split: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text (byte {e.start})") from None
    if split == "file":
        yield text
    else:  # paragraphs: blank-line separated
        paragraph: list[str] = []
        for line in text.splitlines():
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a string {field!r} field")
            yield record[field]


def _expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus the .txt/.jsonl files of any directory (sorted, for a stable order)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus file not found: {p}")
    return files


def load_text_corpus(
    paths: str | os.PathLike | Iterable[str | os.PathLike], split: str = "paragraph", field: str = "text"
) -> Corpus:
    """A corpus from .txt and .jsonl files (or directories of them).

    .txt: one document per blank-line separated paragraph (`split="paragraph"`) or per file
    (`split="file"`). .jsonl: one document per line, taken from the `field` key.
    Raises ValueError if the files hold no document.
    """
    if split not in ("paragraph", "file"):
        raise ValueError(f"split must be 'paragraph' or 'file', got {split!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = _expand_paths(paths)
    if not files:
        raise ValueError("corpus is empty: no .txt or .jsonl file given")
    for f in files:
        if f.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"unsupported corpus file {f}: expected .txt or .jsonl")
        _check_text_file(f)

    def documents() -> Iterator[str]:
        for f in files:
            yield from (_read_jsonl(f, field) if f.suffix == ".jsonl" else _read_txt(f, split))

    # Content identity, cheap to recompute on resume even for large files: name, size, first MiB.
    h = hashlib.sha256(f"{split}|{field}".encode())
    for f in files:
        with f.open("rb") as fh:
            head = fh.read(1 << 20)
        h.update(f"{f.name}|{f.stat().st_size}|".encode() + hashlib.sha256(head).digest())
    name = files[0].name if len(files) == 1 else f"{len(files)} files"
    return Corpus(name=name, documents=documents, fingerprint=h.hexdigest()[:16]).require_nonempty()


class _TokenizerAdapter:
    """One interface over nanochat's tokenizer and Hugging Face tokenizers.

    `encode(text)` gives ids without special tokens; `wrap(chunk)` adds the model's own special
    tokens around one context window (nanochat: a BOS in front; BERT: [CLS] ... [SEP]), so every
    chunk of a long document looks like a sequence the model saw in training.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "get_bos_token_id"):  # nanochat's tokenizer
            bos = tokenizer.get_bos_token_id()
            self.prefix, self.suffix, self.pad_id = [bos], [], bos
        else:  # Hugging Face: learn the special-token template from a one-word example
            full = list(tokenizer("a")["input_ids"])
            bare = self._encode_hf("a")
            start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
            self.prefix, self.suffix = full[:start], full[start + len(bare):]
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _encode_hf(self, text: str) -> list[int]:
        # verbose=False: documents longer than the model's context are expected; they get chunked.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        if hasattr(self.tokenizer, "get_bos_token_id"):
            return list(self.tokenizer.encode(text))
        return self._encode_hf(text)

    def wrap(self, chunk: list[int]) -> list[int]:
        return self.prefix + chunk + self.suffix

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.suffix)


def iter_token_chunks(tokenizer, corpus: Iterable[str], context_length: int) -> Iterator[tuple[int, list[int]]]:
    """(doc_id, token ids) for each context window of each document, special tokens included.

    Documents longer than the context are cut into consecutive windows; doc_id is the document's
    index in corpus order. Raises ValueError if the corpus yields no document.
    """
    adapter = _TokenizerAdapter(tokenizer)
    room = context_length - adapter.num_special
    if room < 1:
        raise ValueError(f"context_length={context_length} leaves no room for text next to "
                         f"{adapter.num_special} special tokens")
    doc_id = -1
    for doc_id, text in enumerate(corpus):
        ids = adapter.encode(text)
        for start in range(0, len(ids), room):
            yield doc_id, adapter.wrap(ids[start:start + room])
    if doc_id < 0:
        name = getattr(corpus, "name", type(corpus).__name__)
        raise ValueError(f"corpus {name!r} is empty: it yields no non-blank document")


def iter_token_batches(tokenizer, corpus: Iterable[str], context_length: int = 128,
                       batch_size: int = 32, skip_tokens: int = 0) -> Iterator[TokenBatch]:
    """Tokenized corpus as TokenBatch(input_ids, attention_mask, doc_ids, positions), each (B, T).

    One context window per row, right-padded to the longest row of the batch (pad positions have
    attention_mask 0, doc_id -1). Deterministic: the same corpus gives the same batches.
    ``skip_tokens``: context windows are left out until at least that many tokens were (whole
    windows, so text an SAE was trained on on this corpus stays out of its evaluation).
    """
    if context_length < 2 or batch_size < 1:
        raise ValueError(f"need context_length >= 2 and batch_size >= 1, got {context_length}, {batch_size}")
    pad_id = _TokenizerAdapter(tokenizer).pad_id
    rows: list[tuple[int, list[int]]] = []

    def make_batch() -> TokenBatch:
        width = max(len(ids) for _, ids in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        doc_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (doc_id, ids) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            doc_ids[r, :len(ids)] = doc_id
            mask[r, :len(ids)] = 1
        positions = torch.arange(width).expand(len(rows), width).clone()
        return TokenBatch(input_ids, mask, doc_ids, positions)

    skipped = 0
    for row in iter_token_chunks(tokenizer, corpus, context_length):
        if skipped < skip_tokens:
            skipped += len(row[1])
            continue
        rows.append(row)
        if len(rows) == batch_size:
            yield make_batch()
            rows = []
    if rows:
        yield make_batch()
