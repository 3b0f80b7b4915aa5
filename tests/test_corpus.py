"""Corpora (Python's own docs, user .txt/.jsonl files) and tokenization into batches."""
import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

from nanochat.tokenizer import ByteTokenizer  # noqa: E402

from fastsae.corpus import (  # noqa: E402
    Corpus,
    default_corpus,
    iter_token_batches,
    iter_token_chunks,
    load_text_corpus,
    stdlib_docstrings,
)


def test_default_corpus_is_python_docs_in_a_fixed_order():
    from pydoc_data.topics import topics

    corpus = default_corpus()
    first = list(islice(corpus, 100))
    assert first == list(islice(default_corpus(), 100))
    assert first[0] == topics[sorted(topics)[0]].strip()
    assert len(first) == 100 and all(doc.strip() == doc and doc for doc in first)
    docstrings = list(islice(stdlib_docstrings(), 2000))
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in docstrings)  # json's module docstring
    assert corpus.name.startswith("python-docs-") and corpus.fingerprint


def test_txt_paragraphs_and_files(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\n  \nsecond\n\nthird\n")
    (tmp_path / "b.txt").write_text("other file\n")
    corpus = load_text_corpus(tmp_path / "a.txt")
    assert list(corpus) == ["first para\nline two", "second", "third"]
    assert list(corpus) == list(corpus)  # re-iterable
    assert list(load_text_corpus(tmp_path, split="file")) == ["first para\nline two\n\n\n  \nsecond\n\nthird",
                                                              "other file"]


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert list(load_text_corpus(path)) == ["one", "two"]
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:2: expected a JSON object with a string 'text' field"):
        list(load_text_corpus(path))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="corpus 'blank.txt' is empty"):
        load_text_corpus(tmp_path / "blank.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="corpus is empty: no .txt or .jsonl file"):
        load_text_corpus(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="corpus 'nothing' is empty"):
        list(iter_token_batches(ByteTokenizer(), Corpus("nothing", lambda: ["", " "], "x"), 16, 4))


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("alpha\n")
    before = load_text_corpus(path).fingerprint
    assert load_text_corpus(path).fingerprint == before
    path.write_text("beta\n")
    assert load_text_corpus(path).fingerprint != before


def test_nanochat_tokenizer_chunks_start_with_bos():
    docs = ["x" * 20, "hello"]
    chunks = list(iter_token_chunks(ByteTokenizer(), docs, context_length=8))
    assert [d for d, _ in chunks] == [0, 0, 0, 1]
    assert all(ids[0] == 256 and len(ids) <= 8 for _, ids in chunks)
    assert bytes(i for _, ids in chunks[:3] for i in ids[1:]) == b"x" * 20


def test_batches_from_a_real_tokenizer():
    from transformers import AutoTokenizer

    from fastsae.sources import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    docs = ["short doc", "a much longer document " * 20, "third"]
    batches = list(iter_token_batches(tok, docs, context_length=16, batch_size=4))
    assert len(tok(docs[1], add_special_tokens=False)["input_ids"]) == 80  # 6 windows of 14 + [CLS], [SEP]
    assert [b.input_ids.shape[0] for b in batches] == [4, 4]  # 1 + 6 + 1 rows
    for b in batches:
        assert b.input_ids.shape == b.attention_mask.shape == b.doc_ids.shape == b.positions.shape
        assert b.input_ids.shape[1] <= 16
        lengths = b.attention_mask.sum(1)
        for r, n in enumerate(lengths.tolist()):
            assert b.input_ids[r, 0] == tok.cls_token_id and b.input_ids[r, n - 1] == tok.sep_token_id
            assert (b.input_ids[r, n:] == tok.pad_token_id).all() and (b.doc_ids[r, n:] == -1).all()
            assert b.positions[r, :n].tolist() == list(range(n))
    doc_ids = torch.cat([b.doc_ids[b.attention_mask.bool()] for b in batches]).unique().tolist()
    assert doc_ids == [0, 1, 2]
    content = [i for b in batches for r in range(b.input_ids.shape[0])
               for i, d in zip(b.input_ids[r].tolist(), b.doc_ids[r].tolist()) if d == 1 and i not in (101, 102)]
    assert content == tok(docs[1], add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="no room for text"):
        list(iter_token_chunks(tok, docs, context_length=2))
