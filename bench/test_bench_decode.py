"""Sparse decode vs dense decode, forward and forward+backward, per backend.

Sparse decode is ``gather`` forward; its backward is ``gather_dot`` (grad of the values) plus
``scatter_add`` (grad of W_dec). Dense decode scatters the code into an [N, d_sae] matrix and
multiplies, and its backward is two more GEMMs. Each group compares the backends at one shape:

* "torch" (``fastsae.torch_backend``) always;
* "triton" (``fastsae.kernels.sparse_matmul``) on a GPU, and on CPU only at the "ci" size, on
  a tiny extra shape, since it runs under the Triton interpreter there (correctness, not speed);
* "dense" as the baseline;
* "sparsify": EleutherAI sparsify's own decoder (``sparsify.utils.decoder_impl``: an
  embedding bag on CPU, its Triton kernel on a GPU) with autograd for the backward, where
  sparsify is installed (``pip install eai-sparsify``, a bench-only dependency).

Run: ``python -m pytest bench/test_bench_decode.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import pytest
import torch

from bench.common import DEVICE, MAIN_SHAPE, ON_GPU, SIZE, synchronized, triton_kernels
from bench.sparsify_recipe import have_sparsify, import_sparsify
from fastsae import torch_backend

triton_backend = triton_kernels("sparse_matmul")

MAIN = MAIN_SHAPE
# Interpreted Triton runs a few MFLOP/s: this shape keeps one call under a second.
TINY = {"N": 32, "d": 64, "m": 256, "k": 8, "dtype": torch.float32}

CASES = [("main", MAIN)] + ([] if ON_GPU or SIZE == "full" else [("tiny", TINY)])
BACKENDS = ["dense", "torch", "triton", "sparsify"]


def _label(s):
    return f"N{s['N']}-d{s['d']}-m{s['m']}-k{s['k']}-{str(s['dtype']).removeprefix('torch.')}"


def _problem(s):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n, d, m, k, dtype = s["N"], s["d"], s["m"], s["k"], s["dtype"]
    # Latents drawn with replacement: repeats are rare at these k/m and harmless to every path.
    indices = torch.randint(0, m, (n, k), device=DEVICE, generator=gen)
    values = torch.rand(n, k, device=DEVICE, generator=gen).to(dtype)
    W = (torch.randn(m, d, device=DEVICE, generator=gen) / d ** 0.5).to(dtype)
    bias = torch.randn(d, device=DEVICE, generator=gen).to(dtype)
    g = torch.randn(n, d, device=DEVICE, generator=gen).to(dtype)
    return values, indices, W, bias, g


def _dense_code(values, indices, m):
    return torch.zeros(indices.shape[0], m, dtype=values.dtype, device=values.device).scatter_add_(1, indices, values)


def _dense_forward(values, indices, W, bias):
    return torch.addmm(bias, _dense_code(values, indices, W.shape[0]), W)


def _dense_forward_backward(values, indices, W, bias, g):
    dense = _dense_code(values, indices, W.shape[0])
    out = torch.addmm(bias, dense, W)
    grad_values = (g @ W.T).gather(1, indices)
    grad_W = dense.T @ g
    return out, grad_values, grad_W, g.sum(0)


def _sparse_forward(backend):
    def forward(values, indices, W, bias):
        return backend.gather(values, indices, W, bias)
    return forward


def _sparse_forward_backward(backend):
    def forward_backward(values, indices, W, bias, g):
        out = backend.gather(values, indices, W, bias)
        grad_values = backend.gather_dot(g, indices, W)
        grad_W = backend.scatter_add(values, indices, g, W.shape[0])
        return out, grad_values, grad_W, g.sum(0)
    return forward_backward


class SparsifyDecode:
    """sparsify's decoder with the ``gather`` / ``gather_dot`` / ``scatter_add`` signatures;
    the backward pair comes from autograd through it, as in sparsify's training."""

    def __init__(self):
        import_sparsify()
        from sparsify.utils import decoder_impl

        self.decode = decoder_impl

    def gather(self, values, indices, W, bias):
        return self.decode(indices, values, W.mT) + bias

    def forward_backward(self, values, indices, W, bias, g):
        values, W = values.detach().requires_grad_(), W.detach().requires_grad_()
        out = self.gather(values, indices, W, bias)
        grad_values, grad_W = torch.autograd.grad(out, (values, W), g)
        return out.detach(), grad_values, grad_W, g.sum(0)


def _backend_or_skip(name, case):
    if SIZE == "full" and not ON_GPU:
        pytest.skip("full shapes need a GPU")
    if name == "dense":
        return None
    if name == "sparsify":
        if not have_sparsify():
            pytest.skip("sparsify is not installed (pip install eai-sparsify)")
        if case != "main":
            pytest.skip("sparsify is compared at the main shape")
        return SparsifyDecode()
    if name == "torch":
        return torch_backend
    if triton_backend is None:
        pytest.skip("Triton is not importable here")
    if not ON_GPU:
        if not triton_backend._interpreting():
            pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1")
        if case != "tiny":
            pytest.skip("interpreted Triton is only benchmarked at the tiny shape")
    return triton_backend


def _run(benchmark, fn, args):
    if ON_GPU:
        # Warm-up rounds absorb compilation and autotuning.
        return benchmark.pedantic(fn, args=args, rounds=20, iterations=1, warmup_rounds=3)
    return benchmark.pedantic(fn, args=args, rounds=15, iterations=1, warmup_rounds=2)


def _info(benchmark, s, backend):
    benchmark.extra_info.update({
        "shape": _label(s), "backend": backend, "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "interpreted": backend == "triton" and not ON_GPU,
    })


def _tol(dtype):
    return {"rtol": 3e-2, "atol": 3e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,s", CASES, ids=[c for c, _ in CASES])
def test_decode_forward(benchmark, case, s, backend):
    impl = _backend_or_skip(backend, case)
    values, indices, W, bias, _ = _problem(s)
    fn = _dense_forward if impl is None else _sparse_forward(impl)
    benchmark.group = f"decode-forward-{_label(s)}"
    _info(benchmark, s, backend)
    out = _run(benchmark, synchronized(fn), (values, indices, W, bias))
    if impl is not None:
        torch.testing.assert_close(out.float(), _dense_forward(values, indices, W, bias).float(), **_tol(s["dtype"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,s", CASES, ids=[c for c, _ in CASES])
def test_decode_forward_backward(benchmark, case, s, backend):
    impl = _backend_or_skip(backend, case)
    values, indices, W, bias, g = _problem(s)
    fn = (_dense_forward_backward if impl is None else
          impl.forward_backward if isinstance(impl, SparsifyDecode) else _sparse_forward_backward(impl))
    benchmark.group = f"decode-forward-backward-{_label(s)}"
    _info(benchmark, s, backend)
    result = _run(benchmark, synchronized(fn), (values, indices, W, bias, g))
    if impl is not None:
        expected = _dense_forward_backward(values, indices, W, bias, g)
        for got, want in zip(result, expected):
            torch.testing.assert_close(got.float(), want.float(), **_tol(s["dtype"]))
