"""The blocked schedule-free AdamW against schedulefree's own AdamWScheduleFree: the same
parameters and state bit for bit, step after step, and checkpoints that load either way."""
from __future__ import annotations

import copy

import pytest
import torch
from schedulefree import AdamWScheduleFree

from fastsae.schedule_free import BlockedAdamWScheduleFree


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((45, 13), (13, 45), (45,), (3,))]


def _run(optimizer_class, steps, seed=0, **kwargs):
    """(parameters in train mode, parameters in eval mode, the optimizer) after ``steps`` steps on
    fixed gradients; the 3-entry parameter never gets a gradient."""
    params = _params(seed)
    optimizer = optimizer_class(params, lr=3e-3, betas=(0.9, 0.999), **kwargs)
    optimizer.train()
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params[:3]:
            p.grad = torch.randn(p.shape, generator=gen) * 10
        optimizer.step()
    trained = [p.detach().clone() for p in params]
    optimizer.eval()
    return trained, [p.detach().clone() for p in params], optimizer


@pytest.mark.parametrize("block", [BlockedAdamWScheduleFree.BLOCK_ELEMENTS, 64, 7])
@pytest.mark.parametrize("options", [{"warmup_steps": 0}, {"warmup_steps": 3, "weight_decay": 0.1},
                                     {"warmup_steps": 0, "r": 1.0, "weight_lr_power": 1.0, "foreach": False}])
def test_blocked_steps_equal_the_parents_bit_for_bit(monkeypatch, block, options):
    """Whole tensors, 64-entry blocks and 7-entry ones (a last block shorter than the rest) give
    the parent's parameters (train and eval mode), z, second moments and running scalars."""
    monkeypatch.setattr(BlockedAdamWScheduleFree, "BLOCK_ELEMENTS", block)
    want_train, want_eval, want = _run(AdamWScheduleFree, 5, **options)
    got_train, got_eval, got = _run(BlockedAdamWScheduleFree, 5, **options)
    assert all(torch.equal(g, w) for g, w in zip(got_train + got_eval, want_train + want_eval))
    assert not torch.equal(got_train[0], _params()[0])  # it did train
    assert torch.equal(got_train[3], _params()[3])  # no gradient, no step
    for p_got, p_want in zip(got.param_groups[0]["params"][:3], want.param_groups[0]["params"][:3]):
        for key in ("z", "exp_avg_sq"):
            assert torch.equal(got.state[p_got][key], want.state[p_want][key])
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert got.param_groups[0][key] == want.param_groups[0][key]


def test_non_contiguous_parameters_step_whole():
    """A transposed parameter (not contiguous) is updated as the parent updates it."""
    results = []
    for cls in (AdamWScheduleFree, BlockedAdamWScheduleFree):
        base = torch.randn(13, 45, generator=torch.Generator().manual_seed(2))
        p = torch.nn.Parameter(base.t())
        assert not p.is_contiguous()
        optimizer = cls([p], lr=1e-2)
        optimizer.train()
        p.grad = torch.ones_like(p)
        optimizer.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


def test_checkpoints_load_either_way():
    """The state dict is the parent's: a run saved by one class resumes in the other with the
    same next step."""
    for save_class, load_class in ((AdamWScheduleFree, BlockedAdamWScheduleFree),
                                   (BlockedAdamWScheduleFree, AdamWScheduleFree)):
        _, _, saved = _run(save_class, 3)
        state = copy.deepcopy(saved.state_dict())  # as a checkpoint file holds it: no shared tensors
        params = saved.param_groups[0]["params"]
        resumed = load_class([torch.nn.Parameter(p.detach().clone()) for p in params], lr=3e-3)
        resumed.load_state_dict(state)
        saved.train()
        resumed.train()
        for a, b in zip(saved.param_groups[0]["params"][:3], resumed.param_groups[0]["params"][:3]):
            a.grad = torch.full_like(a, 0.5)
            b.grad = torch.full_like(b, 0.5)
        saved.step()
        resumed.step()
        pairs = zip(saved.param_groups[0]["params"], resumed.param_groups[0]["params"])
        assert all(torch.equal(a, b) for a, b in pairs)


def test_step_in_eval_mode_is_refused():
    optimizer = BlockedAdamWScheduleFree(_params(), lr=1e-3)
    with pytest.raises(RuntimeError, match=r"eval mode; call optimizer.train\(\) before step\(\)"):
        optimizer.step()


def test_parameters_off_the_cpu_take_the_librarys_own_step(monkeypatch):
    """Off the CPU the library's step runs (its foreach operations are fused kernels there):
    simulated by reporting the parameters as CUDA ones."""
    calls = []
    monkeypatch.setattr(AdamWScheduleFree, "step", lambda self, closure=None: calls.append(closure))
    params = _params()
    optimizer = BlockedAdamWScheduleFree(params, lr=1e-3)
    optimizer.train()
    before = [p.detach().clone() for p in params]
    monkeypatch.setattr(torch.nn.Parameter, "device", property(lambda self: torch.device("cuda")), raising=False)
    optimizer.step()
    monkeypatch.undo()
    assert calls == [None] and all(torch.equal(a, b) for a, b in zip(before, params))
