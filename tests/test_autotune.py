"""Backend "auto": the timing choice, its shape classes, the cache on disk, results equal to
the torch backend's, and fastsae info. On CPU the candidates are the torch backend and the
interpreted Triton kernels, so the timed choice is a real measurement: torch wins."""
import json
import time
import types

import pytest
import torch

from fastsae import autotune, ops
from fastsae.config import SAEConfig
from fastsae.models import create_sae


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAE_CACHE_DIR", str(tmp_path / "cache"))
    autotune._memory.clear()
    yield
    autotune._memory.clear()


def _file():
    return json.loads(autotune.cache_path().read_text())


def test_shape_classes_round_sizes_up_to_powers_of_two():
    a = autotune.shape_class("gather", [torch.zeros(4000, 32), torch.zeros(4000, 32, dtype=torch.long), 7, None])
    b = autotune.shape_class("gather", [torch.zeros(4096, 32), torch.zeros(3000, 17, dtype=torch.long), 8, None])
    c = autotune.shape_class("gather", [torch.zeros(5000, 32), torch.zeros(4000, 32, dtype=torch.long), 7, None])
    d = autotune.shape_class("gather", [torch.zeros(4000, 32, dtype=torch.bfloat16),
                                        torch.zeros(4000, 32, dtype=torch.long), 7, None])
    assert a == b == "gather float32[4096,32] int64[4096,32] 8 None"
    assert c == "gather float32[8192,32] int64[4096,32] 8 None" and d.startswith("gather bfloat16[4096,32]")


def _fake(delay_s, calls):
    def gather(x):
        calls.append(delay_s)
        time.sleep(delay_s)
        return x * 2
    return types.SimpleNamespace(gather=gather)


def test_the_faster_backend_is_kept_and_cached_on_disk():
    calls = []
    impls = {"triton": _fake(0.004, calls), "torch": _fake(0.0, calls)}
    x = torch.ones(3)
    name, out = autotune.choose("gather", (x,), {}, torch.device("cpu"), impls)
    assert name == "torch" and torch.equal(out, x * 2)
    assert len(calls) == 2 * (1 + autotune.REPEATS)  # one warm-up and REPEATS timed calls each
    entry = _file()[autotune.device_key(torch.device("cpu"))]["gather float32[4]"]
    assert entry["backend"] == "torch" and entry["ms"]["triton"] > 3 > entry["ms"]["torch"]
    # the next call of the class runs the choice once, without timing; so does a new process
    calls.clear()
    autotune._memory.clear()
    assert autotune.choose("gather", (torch.ones(4),), {}, torch.device("cpu"), impls)[0] == "torch"
    assert calls == [0.0]
    # the other way round, the other backend wins
    slow_torch = {"triton": _fake(0.0, calls), "torch": _fake(0.004, calls)}
    assert autotune.choose("gather", (torch.ones(40),), {}, torch.device("cpu"), slow_torch)[0] == "triton"


def test_another_device_or_version_times_again(monkeypatch):
    calls = []
    impls = {"triton": _fake(0.002, calls), "torch": _fake(0.0, calls)}
    autotune.choose("gather", (torch.ones(3),), {}, torch.device("cpu"), impls)
    monkeypatch.setattr(autotune, "device_key", lambda device: "NVIDIA H200 | fastsae 9.9")
    calls.clear()
    autotune.choose("gather", (torch.ones(3),), {}, torch.device("cpu"), impls)
    assert len(calls) == 2 * (1 + autotune.REPEATS)
    assert len(_file()) == 2  # both devices' choices kept


def test_an_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FASTSAE_CACHE_DIR", str(blocker))  # a file where the folder should be
    impls = {"triton": _fake(0.002, []), "torch": _fake(0.0, [])}
    assert autotune.choose("gather", (torch.ones(3),), {}, torch.device("cpu"), impls)[0] == "torch"


def test_auto_ops_equal_the_torch_backend_and_time_the_interpreted_kernels_as_slower():
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(37, 24, generator=gen), torch.randn(70, 24, generator=gen), torch.randn(70, generator=gen)
    want = ops.topk_encode(x, W, b, 5, backend="torch")
    got = ops.topk_encode(x, W, b, 5, backend="auto")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    torch.testing.assert_close(ops.sparse_decode(*got[:2], W, backend="auto"), ops.sparse_decode(*got[:2], W))
    choices = autotune.cached_choices(torch.device("cpu"))
    assert sorted(cls.split()[0] for cls in choices) == ["gather", "topk_encode"]
    gather = choices["gather float32[64,8] int64[64,8] float32[128,32] None"]
    assert gather["backend"] == "torch" and gather["ms"]["triton"] > gather["ms"]["torch"]  # the interpreter


def test_a_training_step_on_auto_equals_torch():
    config = SAEConfig(d_in=12, d_sae=40, k=3, dtype="float32")
    x = torch.randn(33, 12, generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("torch", "auto"):
        sae = create_sae(config)
        with ops.use_backend(backend):
            sae.loss(x)["total_loss"].backward()
        grads[backend] = [p.grad for p in sae.parameters()]
    for a, b in zip(grads["torch"], grads["auto"]):
        torch.testing.assert_close(a, b)
    primitives = {cls.split()[0] for cls in autotune.cached_choices(torch.device("cpu"))}
    assert {"topk_encode", "gather"} <= primitives  # forward and backward primitives chosen apart


def test_info_lists_the_cached_choices(monkeypatch):
    from fastsae.cli_info import info_lines

    monkeypatch.setenv("FASTSAE_BACKEND", "auto")
    ops.sparse_decode(torch.rand(5, 2), torch.randint(0, 9, (5, 2)), torch.randn(9, 4))
    lines = info_lines("cpu")
    assert "backend  topk_encode        auto" in lines
    assert any("1 choices cached for this device" in line for line in lines)
    assert any(line.startswith("auto     gather float32[8,2] int64[8,2] float32[16,4] None: torch (triton ")
               for line in lines), lines
