"""Variable-L0 encode (Gated, JumpReLU/ReLU): the one-GEMM CSR kernels vs dense torch.

* ``gated``: ``fastsae.kernels.encode.gated_encode`` (magnitudes, gate values, CSR pattern and
  the per-row L1 of the gate) vs a dense formula: the gate GEMM into an [N, d_sae] tensor,
  the open-gate mask, ``nonzero`` to CSR, magnitudes and L1 from the dense gate.
* ``threshold``: ``threshold_encode`` (JumpReLU cutoffs) for the kernel and for
  ``fastsae.torch_backend``, whose CPU GEMM runs in fp32 (``torch-fp32``) or in bf16 with the
  entries near their cutoff rescored in fp32 (``torch-bf16``, candidates per row in
  ``extra_info``), side by side in one run.

Biases are set so about ``l0`` latents fire per row, like a trained SAE. Each case records
time (pytest-benchmark) and peak memory (``extra_info["peak_bytes"]``). Triton runs on a
GPU, or on CPU at a tiny shape under the interpreter (a correctness run, not a speed figure).

Run: ``python -m pytest bench/test_bench_gated.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import os

import pytest
import torch

from bench.common import DEVICE, ON_GPU, SIZE, peak_memory, shapes, synchronized, triton_kernels
from fastsae import torch_backend

triton_gated = triton_kernels("encode")

MAIN = shapes(
    ci={"N": 2048, "d": 384, "m": 6144, "l0": 64, "dtype": torch.float32},
    full={"N": 16384, "d": 4096, "m": 131072, "l0": 64, "dtype": torch.bfloat16},
)
# Interpreted Triton manages a few MFLOP/s: this shape keeps one call around a second.
TINY = {"N": 32, "d": 64, "m": 256, "l0": 16, "dtype": torch.float32}

CASES = [("main", MAIN)] + ([] if ON_GPU or SIZE == "full" else [("tiny", TINY)])


def _label(s):
    return f"N{s['N']}-d{s['d']}-m{s['m']}-l0{s['l0']}-{str(s['dtype']).removeprefix('torch.')}"


def _problem(s):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n, d, m, dtype = s["N"], s["d"], s["m"], s["dtype"]
    x = torch.randn(n, d, device=DEVICE, generator=gen)
    b_dec = torch.randn(d, device=DEVICE, generator=gen) * 0.1
    W = torch.randn(m, d, device=DEVICE, generator=gen) / d ** 0.5  # pre-activations ~ N(0, 1)
    # Shift each latent so P(pre > 0) = l0 / m: about l0 latents open per row.
    b = -torch.special.ndtri(torch.tensor(1.0 - s["l0"] / m, device=DEVICE)).expand(m).clone()
    r_mag = torch.randn(m, device=DEVICE, generator=gen) * 0.1
    b_mag = torch.randn(m, device=DEVICE, generator=gen) * 0.1
    dec_norm = torch.rand(m, device=DEVICE, generator=gen) + 0.5
    cutoff = torch.rand(m, device=DEVICE, generator=gen) * 0.1  # JumpReLU: threshold - bandwidth / 2
    x = x + b_dec
    return [t.to(dtype).contiguous() for t in (x, W, b, r_mag, b_mag, b_dec, dec_norm, cutoff)]


def _dense_gated(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm):
    pi = torch.addmm(b_gate, x - b_dec, W.t())  # the [N, d_sae] tensor the kernel avoids
    mask = pi > 0
    row, col = mask.nonzero(as_tuple=True)
    offsets = torch.zeros(x.shape[0] + 1, dtype=torch.long, device=x.device)
    torch.cumsum(mask.sum(1), 0, out=offsets[1:])
    pi_values = pi[row, col]
    mag = torch.relu(pi_values * r_mag[col].exp() + b_mag[col])
    l1 = (torch.relu(pi) * dec_norm).sum(1)
    return mag, pi_values, col, offsets, l1


def _triton_gated(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm):
    return triton_gated.gated_encode(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm=dec_norm)


def _skip_unless_runnable(backend, case):
    if SIZE == "full" and not ON_GPU:
        pytest.skip("full shapes need a GPU")
    if backend != "triton":
        return
    if triton_gated is None:
        pytest.skip("Triton is not importable here")
    if not ON_GPU:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1")
        if case != "tiny":
            pytest.skip("interpreted Triton is only benchmarked at the tiny shape")


def _run(benchmark, fn, args):
    if ON_GPU:
        # Warm-up rounds absorb compilation and autotuning.
        return benchmark.pedantic(fn, args=args, rounds=10, iterations=1, warmup_rounds=3)
    return benchmark.pedantic(fn, args=args, rounds=3, iterations=1, warmup_rounds=1)


def _info(benchmark, s, backend, fn, args, nnz):
    benchmark.extra_info.update({
        "shape": _label(s), "backend": backend, "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "interpreted": backend == "triton" and not ON_GPU,
        "peak_bytes": int(peak_memory(fn, *args)),
        "nnz": nnz,
    })


def _check_csr_close(got, want, dtype):
    """Same CSR up to entries that rounding moves across the cutoff (16-bit GEMMs)."""
    g_offs, w_offs = got[3].cpu(), want[3].cpu()
    if dtype == torch.float32:
        assert torch.equal(g_offs, w_offs) and torch.equal(got[2].cpu(), want[2].cpu())
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)
    else:
        assert abs(int(g_offs[-1]) - int(w_offs[-1])) <= 1e-3 * int(w_offs[-1]) + 8
    torch.testing.assert_close(got[4].float(), want[4].float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["dense", "triton"])
@pytest.mark.parametrize("case,s", CASES, ids=[c for c, _ in CASES])
def test_gated_forward(benchmark, case, s, backend):
    _skip_unless_runnable(backend, case)
    x, W, b, r_mag, b_mag, b_dec, dec_norm, _ = _problem(s)
    args = (x, W, b, r_mag, b_mag, b_dec, dec_norm)
    fn = _dense_gated if backend == "dense" else _triton_gated
    benchmark.group = f"gated-forward-{_label(s)}"
    out = _run(benchmark, synchronized(fn), args)
    _info(benchmark, s, backend, fn, args, int(out[3][-1]))
    if backend == "triton":
        _check_csr_close(out, _dense_gated(*args), s["dtype"])


THRESHOLD_BACKENDS = ["torch", "triton"] if ON_GPU else ["torch-fp32", "torch-bf16", "triton"]


@pytest.mark.parametrize("backend", THRESHOLD_BACKENDS)
@pytest.mark.parametrize("case,s", CASES, ids=[c for c, _ in CASES])
def test_threshold_forward(benchmark, monkeypatch, case, s, backend):
    _skip_unless_runnable(backend, case)
    x, W, b, _, _, b_dec, _, cutoff = _problem(s)
    args = (x, W, b, b_dec, cutoff)
    if backend.startswith("torch-"):  # the CPU GEMM in fp32, or in bf16 with the candidates rescored
        monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", backend.removeprefix("torch-"))
    fn = torch_backend.threshold_encode if backend.startswith("torch") else triton_gated.threshold_encode
    benchmark.group = f"threshold-forward-{_label(s)}"
    torch_backend.reset_selection_counts()
    out = _run(benchmark, synchronized(fn), args)
    _info(benchmark, s, backend, fn, args, int(out[2][-1]))
    stats = torch_backend.THRESHOLD_STATS
    if stats["rows"]:
        benchmark.extra_info["candidates_per_row"] = round(stats["candidates"] / stats["rows"], 1)
        benchmark.extra_info["fp32_row_fraction"] = stats["fp32_rows"] / (stats["rows"] + stats["fp32_rows"])
    if backend != "torch-fp32" and s["dtype"] == torch.float32:
        monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp32")
        want = torch_backend.threshold_encode(*args)
        assert torch.equal(out[2].cpu(), want[2].cpu()) and torch.equal(out[1].cpu(), want[1].cpu())
        torch.testing.assert_close(out[0], want[0], rtol=1e-4, atol=1e-4)
