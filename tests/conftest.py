"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, which is why it is set here,
at the top of the first module pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine run faster, and more predictably, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stub_store(tmp_path_factory):
    """An activation store from the nanochat stand-in (d_model 32), collected once."""
    from nanochat_stub import nanochat

    from fastsae.corpus import Corpus
    from fastsae.store import collect_to_store

    gpt, tokenizer = nanochat("gpt"), nanochat("tokenizer")
    GPT, GPTConfig, ByteTokenizer = gpt.GPT, gpt.GPTConfig, tokenizer.ByteTokenizer
    torch.manual_seed(0)
    texts = Corpus("words", lambda: [f"document {i} says " + "word " * (3 + i % 7) for i in range(400)], "words-400")
    path = tmp_path_factory.mktemp("store") / "acts"
    collect_to_store(GPT(GPTConfig(n_embd=32)).eval(), ByteTokenizer(), texts, "blocks.1.hook_resid_post", path,
                     2560, shard_tokens=512, progress=False)
    return path


@pytest.fixture
def tiny():
    """The nanochat stand-in: a seeded 2-block, 16-wide GPT and its byte tokenizer."""
    from nanochat_stub import tiny_model

    return tiny_model()
