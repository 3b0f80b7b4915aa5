"""The nanochat stand-in package (tests/stubs/nanochat), imported on demand: the stubs folder is
on sys.path only while a caller needs it, so no test finds it there by accident."""
import contextlib
import importlib
import sys
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"


@contextlib.contextmanager
def stubs_on_path():
    sys.path.insert(0, str(STUBS))
    try:
        yield
    finally:
        sys.path.remove(str(STUBS))


def nanochat(module: str):
    """``nanochat.<module>`` of the stand-in."""
    with stubs_on_path():
        return importlib.import_module(f"nanochat.{module}")


def tiny_model():
    """A seeded 2-block, 16-wide stand-in GPT in eval mode and its byte tokenizer."""
    import torch

    gpt = nanochat("gpt")
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(n_layer=2, n_embd=16)).eval(), nanochat("tokenizer").ByteTokenizer()


def number_docs(n: int):
    """A corpus of n short numbered documents of 1 to 5 repeats each."""
    from fastsae.corpus import Corpus

    return Corpus("numbers", lambda: [f"document number {i} " * (1 + i % 5) for i in range(n)], f"numbers-{n}")
