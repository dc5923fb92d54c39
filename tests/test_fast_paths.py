"""The per-step shortcuts of the training loop give what the general code paths give.

- ``direct_step``: the same parameters and momentum buffers as ``SGD.step``, bit for bit
  (through the functional update and the fused kernel directly, parameters without a
  gradient included), and ``optimizer.step()`` itself whenever hooks or a scheduler expect
  that call;
- ``InProcessLoader``: the batches of a DataLoader with the same sampler, skipping and
  epochs included;
- ``Gathered`` / ``collate``: a batch gathered at once equals item-by-item collation;
- ``weighted_sum`` / ``plain_backward``: the sum the weighting took before, bit for bit,
  and a plain backward pass only where Accelerate would do nothing else; its seed gradient,
  made once, gives ``loss.backward()``'s gradients and never becomes a leaf's ``.grad``.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from mtl.batches import Gathered, InProcessLoader, collate
from mtl.config import TrainerConfig
from mtl.optim import build_optimizer, clear_grads, direct_step
from mtl.sampling import EpochShuffleSampler
from mtl.weighting import build_weighting
from mtl.weighting.base import plain_backward, weighted_sum

from conftest import make_trainer


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _train(step_with, seed: int = 0, steps: int = 6, **sgd):
    """Train a small net for ``steps`` steps with SGD(``sgd``), stepping through ``step_with(optimizer)``."""
    net = _net(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, fused=True, **sgd)
    step = step_with(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        F.cross_entropy(net(x), y).backward()
        step()
        clear_grads(opt)
    return net, opt


@pytest.mark.parametrize("sgd", [
    {"momentum": 0.9},
    {"momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    {"momentum": 0.5, "dampening": 0.3, "maximize": True},
    {"momentum": 0.0, "weight_decay": 0.1},
])
def test_direct_step_matches_sgd_step_bit_for_bit(sgd):
    ref_net, ref_opt = _train(lambda opt: opt.step, **sgd)
    net, opt = _train(direct_step, **sgd)
    assert direct_step(opt) is not opt.step  # the shortcut was taken
    for a, b in zip(ref_net.parameters(), net.parameters()):
        assert torch.equal(a, b)
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        ref_buf, buf = ref_state[k].get("momentum_buffer"), state[k].get("momentum_buffer")
        assert (ref_buf is None) == (buf is None)
        if ref_buf is not None:
            assert torch.equal(ref_buf, buf)


def test_direct_step_matches_sgd_step_with_parameters_that_get_no_gradient():
    """A layer in the optimizer that the loss never uses (an old task's head): SGD.step skips it, and so does
    the fused kernel called directly once the other parameters have their momentum buffers."""

    def train(step_with):
        torch.manual_seed(0)
        body, unused = nn.Linear(5, 3), nn.Linear(3, 3)
        opt = torch.optim.SGD([*body.parameters(), *unused.parameters()], lr=0.1, momentum=0.9, fused=True)
        step = step_with(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            F.cross_entropy(body(x), y).backward()
            step()
            clear_grads(opt)
        return [*body.parameters(), *unused.parameters()], opt

    ref_params, ref_opt = train(lambda opt: opt.step)
    params, opt = train(direct_step)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert list(state) == list(ref_state) == [0, 1]  # no entry for the unused layer
    for k in state:
        assert torch.equal(ref_state[k]["momentum_buffer"], state[k]["momentum_buffer"])


@pytest.mark.parametrize("stepping", ["direct", "step"])
def test_fused_sgd_from_build_optimizer_steps_parameters_whose_first_gradient_comes_late(stepping):
    """torch's fused SGD alone fails once a parameter gets its first gradient after the others have momentum
    buffers (an old task's head first reached by a replayed sample); build_optimizer's zero buffers give
    the update a missing buffer gives: the same as the per-parameter SGD."""

    def train(make):
        torch.manual_seed(0)
        body, late, frozen = nn.Linear(5, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        frozen.requires_grad_(False)
        params = [*body.parameters(), *late.parameters(), *frozen.parameters()]
        opt, step = make(params)
        gen = torch.Generator().manual_seed(1)
        for k in range(5):
            x, y = torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            out = body(x) if k < 2 else late(body(x))
            F.cross_entropy(out, y).backward()
            step()
            clear_grads(opt)
        return params, opt

    def ours(params):
        opt = build_optimizer(params, TrainerConfig(optimizer="sgd", lr=0.1, momentum=0.9), device="cpu")
        return opt, direct_step(opt) if stepping == "direct" else opt.step

    def per_parameter(params):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
        return opt, opt.step

    params, opt = train(ours)
    ref_params, _ = train(per_parameter)
    assert opt.param_groups[0]["fused"]
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len(opt.state_dict()["state"]) == 4  # buffers for the trainable parameters only


def test_direct_step_defers_to_step_for_hooks_and_schedulers():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    step = direct_step(opt)
    calls = []
    handle = opt.register_step_post_hook(lambda *_: calls.append("post"))
    F.cross_entropy(net(torch.randn(2, 5)), torch.tensor([0, 1])).backward()
    step()
    assert calls == ["post"]  # the hook ran: optimizer.step() did the update
    handle.remove()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "step" in vars(opt)  # the scheduler wrapped the instance's step
    with torch.no_grad():
        before = [p.clone() for p in net.parameters()]
    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler.step()
    assert not [w for w in caught if "optimizer.step()" in str(w.message)]  # the scheduler saw the step
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_direct_step_is_the_plain_step_for_other_optimizers():
    net = _net()
    adam = torch.optim.Adam(net.parameters())
    assert direct_step(adam) == adam.step
    unfused = torch.optim.SGD(net.parameters(), lr=0.1)
    assert direct_step(unfused) == unfused.step


def test_build_optimizer_fuses_on_cpu_and_cuda_only():
    params = list(_net().parameters())
    assert build_optimizer(params, TrainerConfig(optimizer="sgd"), device="cpu").param_groups[0]["fused"]
    assert build_optimizer(params, TrainerConfig(optimizer="adamw"), device=torch.device("cpu")).param_groups[0]["fused"]
    assert not build_optimizer(params, TrainerConfig(optimizer="sgd")).param_groups[0]["fused"]
    assert not build_optimizer(params, TrainerConfig(optimizer="adam"), device="meta").param_groups[0]["fused"]


# ----- batches ----------------------------------------------------------------------------------


class GatheringData(Dataset):
    """Images and labels that fetch a batch in one gather, and count the items fetched."""

    def __init__(self, n: int = 23):
        self.images = torch.arange(n * 6, dtype=torch.float32).view(n, 1, 2, 3)
        self.labels = torch.arange(n) % 4
        self.fetched = 0
        self.epoch = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.fetched += 1
        return self.images[i], self.labels[i], 7

    def __getitems__(self, indices):
        self.fetched += len(indices)
        index = torch.as_tensor(indices)
        return Gathered(self.images[index], self.labels[index], torch.full((len(index),), 7))

    def set_epoch(self, epoch):
        self.epoch = epoch


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert torch.equal(u, v)


def test_gathered_batch_collates_like_its_items():
    data = GatheringData()
    indices = [4, 0, 17, 9]
    gathered = data.__getitems__(indices)
    assert len(gathered) == 4 and torch.equal(gathered[2][0], data.images[17])
    by_item = default_collate([data[i] for i in indices])
    _same_batches([collate(gathered)], [by_item])
    _same_batches([default_collate(gathered)], [by_item])  # still a sequence of samples for torch's collate
    with pytest.raises(ValueError, match="one length"):
        Gathered(torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("dataset", ["gathering", "tensor"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_in_process_loader_yields_the_dataloaders_batches(dataset, drop_last):
    data = GatheringData() if dataset == "gathering" else TensorDataset(torch.randn(23, 3), torch.arange(23))
    sampler = EpochShuffleSampler(len(data), seed=3)
    loader = InProcessLoader(data, sampler, batch_size=5, drop_last=drop_last)
    reference = DataLoader(data, batch_size=5, sampler=sampler, drop_last=drop_last, collate_fn=collate)
    assert len(loader) == len(reference) == (4 if drop_last else 5)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        ours = list(loader)
        _same_batches(ours, list(reference))
        _same_batches(list(loader.batches(skip=2)), ours[2:])
    if dataset == "gathering":
        assert data.epoch == 1  # set_epoch reached the data set


def test_in_process_loader_skips_without_fetching():
    data = GatheringData()
    loader = InProcessLoader(data, EpochShuffleSampler(len(data), seed=0), batch_size=5)
    data.fetched = 0
    assert len(list(loader.batches(skip=3))) == 2
    assert data.fetched == 8  # batches 4 (5 samples) and 5 (3 samples) only


def test_trainer_trains_in_process_on_one_cpu_process(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, optimizer="sgd", cpu=True)
    assert isinstance(trainer.train_loader, InProcessLoader)
    assert trainer.optimizer.param_groups[0]["fused"]
    assert trainer._optimizer_step is not trainer.optimizer.step  # the direct step
    history = trainer.fit()
    assert history["epochs"][0]["step"] == len(trainer.train_loader) == 6  # 96 samples, batch 16


# ----- weighting --------------------------------------------------------------------------------


def test_weighted_sum_is_the_plain_sum_bit_for_bit():
    torch.manual_seed(0)
    a, b, c = (torch.randn((), requires_grad=True) for _ in range(3))
    w = torch.tensor(0.37)
    plain = sum(wt * x for wt, x in [(1.0, a), (0.3, b), (w, c)]) + 0.0
    assert torch.equal(weighted_sum([(1.0, a), (0.3, b), (w, c), (1.0, 0.0)]), plain)
    assert weighted_sum([(1.0, a)]) is a  # no node added for a weight of 1
    with pytest.raises(Exception, match="at least one loss"):
        weighted_sum([(1.0, 0.0)])


def test_plain_backward_only_where_accelerate_adds_nothing():
    base = dict(scaler=None, mixed_precision="no", gradient_accumulation_steps=1, distributed_type="NO")
    assert plain_backward(types.SimpleNamespace(**base))
    assert plain_backward(types.SimpleNamespace(**{**base, "distributed_type": "MULTI_GPU"}))  # DDP: inside backward
    for change in ({"scaler": object()}, {"mixed_precision": "fp16"}, {"gradient_accumulation_steps": 2},
                   {"distributed_type": "DEEPSPEED"}):
        assert not plain_backward(types.SimpleNamespace(**{**base, **change}))


def test_plain_run_backward_gives_loss_backward_gradients_and_keeps_its_seed():
    weighting = build_weighting("equal", ["a"])
    net = _net()
    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 0])
    F.cross_entropy(net(x), y).backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    weighting.run_backward(F.cross_entropy(net(x), y))
    for p, g in zip(net.parameters(), expected):
        assert torch.equal(p.grad, g)
    leaf = torch.tensor(3.0, requires_grad=True)  # a loss that is itself a leaf gets a gradient of its own
    weighting.run_backward(leaf)
    leaf.grad.add_(10.0)
    other = torch.tensor(5.0, requires_grad=True)
    weighting.run_backward(other * 2)
    assert leaf.grad.item() == 11.0 and other.grad.item() == 2.0
    with pytest.raises(RuntimeError, match="scalar"):
        weighting.run_backward(net(x).sum(1))
