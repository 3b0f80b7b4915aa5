"""Kept CPU buffers (fastsae.buffers) and the weight-gradient sums that write into them."""
import pytest
import torch

from fastsae import buffers, ops, selection
from fastsae import torch_backend as tb


@pytest.fixture
def small_buffers(monkeypatch):
    """Buffers of 4 KiB and up are kept (within buffers.kept()), so small tensors take that path."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 4096)
    buffers.release()
    yield
    buffers.release()


@pytest.fixture
def kept(small_buffers):
    with buffers.kept():
        yield


def test_a_storage_is_handed_out_again_only_once_unused(kept):
    first = buffers.empty((64, 32), torch.float32, "cpu")
    ptr = first.data_ptr()
    second = buffers.empty((64, 32), torch.float32, "cpu")
    assert second.data_ptr() != ptr  # the first is still in use
    del first
    third = buffers.empty((32, 64), torch.float32, "cpu")  # same bytes, another shape
    assert third.data_ptr() == ptr and third.shape == (32, 64) and third.is_contiguous()
    half = buffers.empty((64, 64), torch.bfloat16, "cpu")  # same bytes, another dtype
    assert half.dtype == torch.bfloat16 and half.data_ptr() not in (ptr, second.data_ptr())
    del half
    assert buffers.zeros((64, 64), torch.bfloat16, "cpu").abs().sum() == 0
    assert buffers.empty((8, 8), torch.float32, "cpu").untyped_storage().nbytes() == 256  # small: not kept
    assert len(buffers._kept) == 3


def test_kept_storages_are_bounded_and_released(kept, monkeypatch):
    monkeypatch.setattr(buffers, "KEEP", 2)
    alive = [buffers.empty((1024 + i,), torch.float32, "cpu") for i in range(4)]
    assert [s.nbytes() for s in buffers._kept] == [4 * 1026, 4 * 1027]  # the last two made
    del alive
    buffers.release()
    assert buffers._kept == []


def test_a_gradient_in_a_kept_buffer_is_the_parameters_own_and_reused_after_zero_grad(kept):
    """Autograd keeps the buffer as .grad (no copy); after the grad is dropped, the next
    backward writes into the same memory; a grad the caller still holds is never overwritten."""
    gen = torch.Generator().manual_seed(0)
    n, d, m, k = 40, 24, 96, 4
    W = torch.randn(m, d, generator=gen, requires_grad=True)
    values = torch.rand(n, k, generator=gen)
    indices = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
    g = torch.randn(n, d, generator=gen)

    def backward():
        (ops.sparse_decode(values, indices, W, backend="torch") * g).sum().backward()

    backward()
    ptr = W.grad.data_ptr()
    want = torch.zeros(m, d, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), values.reshape(-1, 1).double() * g.double().repeat_interleave(k, 0))
    torch.testing.assert_close(W.grad, want.float())
    assert any(s.data_ptr() == ptr for s in buffers._kept)
    W.grad = None
    backward()
    assert W.grad.data_ptr() == ptr
    held = W.grad
    before = held.clone()
    W.grad = None
    values.mul_(2)
    backward()
    assert W.grad.data_ptr() != ptr and torch.equal(held, before)
    torch.testing.assert_close(W.grad, 2 * before)


@pytest.mark.parametrize("block_bytes", [4 * 24, 4 * 24 * 7, 4 * 24 * 96])  # 1, 7 (a tail), all latents
def test_blocked_sums_equal_one_embedding_bag(kept, monkeypatch, block_bytes):
    """Summed block of latents by block into a kept buffer: bit for bit the single pass's sums,
    empty latents and a hot latent included, for fixed-k and CSR codes."""
    gen = torch.Generator().manual_seed(1)
    n, d, m, k = 33, 24, 96, 5
    indices = torch.randint(0, m // 2, (n, k), generator=gen)  # latents m/2.. stay empty
    indices[torch.rand(n, k, generator=gen) < 0.3] = 7
    values, g = torch.randn(n, k, generator=gen), torch.randn(n, d, generator=gen)
    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 40)
    whole = tb.scatter_add(values, indices, g, m)
    lengths = torch.randint(0, 9, (n,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    csr_indices = torch.randint(0, m, (int(offsets[-1]),), generator=gen)
    csr_values = torch.randn(csr_indices.numel(), generator=gen)
    csr_whole = tb.csr_scatter_add(csr_values, csr_indices, offsets, g, m)
    monkeypatch.setattr(buffers, "MIN_BYTES", 4096)
    monkeypatch.setattr(tb, "SUMS_BLOCK_BYTES", block_bytes)
    tb._latent_majors.clear()
    blocked = tb.scatter_add(values, indices, g, m)
    assert torch.equal(blocked, whole) and not bool(blocked[m // 2:].any())
    assert any(s.data_ptr() == blocked.data_ptr() for s in buffers._kept)
    assert torch.equal(tb.csr_scatter_add(csr_values, csr_indices, offsets, g, m), csr_whole)


def test_a_smaller_tensor_takes_the_largest_unused_storage_that_holds_it_in_twice_its_size(kept):
    """... and the smaller ones that would have held it are dropped."""
    small, big, bigger = (buffers.empty((n,), torch.float32, "cpu") for n in (2048, 3072, 4096))
    ptrs = [t.data_ptr() for t in (small, big, bigger)]
    del small, big, bigger
    assert buffers.empty((4500,), torch.float32, "cpu").data_ptr() not in ptrs  # 18000 bytes: none holds it
    half = buffers.empty((4096,), torch.bfloat16, "cpu")  # 8 KiB: the 16 KiB storage, the 8 and 12 KiB dropped
    assert half.data_ptr() == ptrs[2] and half.shape == (4096,)
    assert ptrs[0] not in {s.data_ptr() for s in buffers._kept} and ptrs[1] not in {s.data_ptr() for s in buffers._kept}
    assert len(buffers._kept) == 2


def test_training_puts_the_bf16_encoder_copy_where_the_last_gradients_were(small_buffers, monkeypatch):
    """With the gradients dropped before the forward, the encoder's bf16 copy (half a gradient's
    bytes) is made in a gradient's kept storage: no storage beyond the gradients' is kept."""
    from fastsae import SAEConfig, create_sae
    from fastsae.trainer import SAETrainer

    monkeypatch.setattr(tb, "BF16_MIN_ROWS", 1)
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 32, generator=gen)
    cfg = SAEConfig(d_in=32, d_sae=1024, k=4, batch_size=256, num_epochs=3, dtype="float32")
    trainer = SAETrainer(create_sae(cfg), cfg, x, device="cpu", log_every=10**9)
    copies = []
    real = selection.rounded_encoder
    monkeypatch.setattr(selection, "rounded_encoder",
                        lambda *a, **kw: (lambda out: copies.append(out[0].data_ptr()) or out)(real(*a, **kw)))
    for _ in range(3):
        trainer.train_step(x)
    grads = {trainer.sae.W_dec.grad.data_ptr(), trainer.sae.enc_weight.grad.data_ptr()}
    assert {s.data_ptr() for s in buffers._kept} == grads
    assert len(copies) == 3 and copies[-1] in grads


def test_outside_kept_nothing_is_kept(monkeypatch):
    """An evaluation or a runtime copy made outside a training step holds no storage here."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 4096)
    buffers.release()
    first = buffers.empty((64, 32), torch.float32, "cpu")
    assert buffers._kept == [] and first.shape == (64, 32)
    with buffers.kept():
        with buffers.kept():
            inner = buffers.empty((64, 32), torch.float32, "cpu")
        outer = buffers.empty((64, 32), torch.float32, "cpu")  # still inside the outer block
    assert len(buffers._kept) == 2 and buffers._active == 0
    del inner, outer
    assert buffers.empty((64, 32), torch.float32, "cpu").data_ptr() not in {s.data_ptr() for s in buffers._kept}
    buffers.release()
