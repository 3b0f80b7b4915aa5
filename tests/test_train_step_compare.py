"""bench/train_step_compare.py: alternated timing, its report, its argument check."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench.common import alternated_times  # noqa: E402
from bench.train_step_compare import counting_faults, cpu_model, main  # noqa: E402


def test_steps_alternate_one_of_each_per_round_after_a_warm_up():
    calls = []
    times = alternated_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4  # one warm-up each, then three rounds
    assert [len(t) for t in times.values()] == [3, 3] and all(v >= 0 for t in times.values() for v in t)


def test_report_names_the_cpu_and_the_ratio(capsys):
    pytest.importorskip("sparsify")
    main(["--shape", "256", "16", "128", "4", "--rounds", "2"])
    out = capsys.readouterr().out
    assert out.startswith(cpu_model()) and "N 256, d_in 16, d_sae 128, k 4; 2 rounds" in out
    assert "fastsae / sparsify:" in out and "x (minima)" in out
    assert out.count("page faults per step") == 2


def test_faults_are_counted_per_call(monkeypatch):
    """Each call's count is the rise of the process's minor faults across it; a call that writes
    to fresh anonymous memory takes at least one."""
    import mmap
    import types

    from bench import train_step_compare

    counts = []

    def touch_fresh_pages():
        region = mmap.mmap(-1, 8 * 2**20)
        for offset in range(0, len(region), mmap.PAGESIZE):
            region[offset] = 1
        return "done"

    assert counting_faults(touch_fresh_pages, counts)() == "done" and len(counts) == 1 and counts[0] >= 1
    readings = iter([100, 130, 130, 131])
    monkeypatch.setattr(train_step_compare.resource, "getrusage",
                        lambda who: types.SimpleNamespace(ru_minflt=next(readings)))
    step = counting_faults(lambda: None, counts)
    step(), step()
    assert counts[1:] == [30, 1]


def test_rounds_must_be_positive():
    pytest.importorskip("sparsify")
    with pytest.raises(SystemExit, match="--rounds must be >= 1, got 0"):
        main(["--rounds", "0"])
