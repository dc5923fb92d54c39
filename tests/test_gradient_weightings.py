"""GradNorm, MGDA and MGDA-UB on hand-checked two-task cases, and their bad input."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from mtl.errors import ConfigError
from mtl.model import MultiTaskModel
from mtl.weighting import build_weighting
from mtl.weighting.gradnorm import GradNormWeighting
from mtl.weighting.graph import walk_to_boundary

X = torch.tensor([[1.0, 2.0]])  # one sample


class Project(nn.Module):
    """Head computing scale * <direction, z>: its gradient w.r.t. z is scale * direction."""

    def __init__(self, direction, scale):
        super().__init__()
        self.direction = torch.tensor(direction)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, z):
        return self.scale * (z @ self.direction)


def toy_model():
    encoder = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 2.0]]))
    return MultiTaskModel(encoder, {"a": Project([1.0, 0.0], 1.0), "b": Project([0.0, 1.0], 2.0)})


def step(model, weighting):
    outputs, z = model(X, return_rep=True)
    losses = {t: outputs[t].sum() for t in ("a", "b")}
    return weighting.backward(losses, shared_params=list(model.shared_parameters()), rep=z), z.detach()


@pytest.mark.parametrize("name", ["mgda", "mgda_ub"])
def test_min_norm_weightings_on_a_hand_checked_case(name):
    # dLa/dz = [1, 0], dLb/dz = [0, 2]: Gram (up to ||x||^2 for exact MGDA) diag(1, 4);
    # the min-norm point of the segment is alpha = (4/5, 1/5).
    model = toy_model()
    weights, z = step(model, build_weighting(name, ["a", "b"]))
    assert weights["a"] == pytest.approx(0.8, abs=1e-6) and weights["b"] == pytest.approx(0.2, abs=1e-6)
    # shared layer: sum_t alpha_t outer(dLt/dz, x) = outer([0.8, 0.4], x)
    expected = torch.outer(torch.tensor([0.8, 0.4]), X[0])
    assert torch.allclose(model.encoder.weight.grad, expected, atol=1e-6)
    # heads: their own task's gradient, unweighted (Sener & Koltun, Algorithm 2): dLa/dscale = z_0
    assert model.heads["a"].scale.grad == pytest.approx(float(z[0, 0]))
    assert model.heads["b"].scale.grad == pytest.approx(float(z[0, 1]))


def test_mgda_l2_normalisation_balances_gradient_sizes():
    # normalised gradients [1,0] and [0,1] are orthogonal unit vectors: alpha = (1/2, 1/2)
    model = toy_model()
    weights, _ = step(model, build_weighting("mgda_ub", ["a", "b"], normalization="l2"))
    assert weights == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-6)


def test_gradnorm_on_a_hand_checked_case():
    # grad_W La = outer([1,0], x) * 1, grad_W Lb = outer([0,1], x) * 2: norms sqrt5 and 2 sqrt5.
    model = toy_model()
    g = GradNormWeighting(["a", "b"], alpha=1.5, lr=0.1)
    weights, _ = step(model, g)
    assert weights == {"a": 1.0, "b": 1.0}  # the weights used in this step
    # network gradient: sum_t w_t grad L_t with w = 1
    assert torch.allclose(model.encoder.weight.grad, torch.outer(torch.tensor([1.0, 2.0]), X[0]))
    # at step 1 all r_t = 1, target = mean G = 1.5 sqrt5: task b is above it, so w_b goes down.
    # Adam's first step moves each weight by lr against the sign of its gradient; the sum stays T = 2.
    assert g.task_weights.detach().tolist() == pytest.approx([1.1, 0.9])
    assert g.initial_losses.tolist() == pytest.approx([2.0, 7.0])  # La = z_0 = 2, Lb = 2 z_1 = 7
    weights, _ = step(model, g)
    assert weights == pytest.approx({"a": 1.1, "b": 0.9})


def test_gradnorm_renormalises_to_the_number_of_tasks():
    model = toy_model()
    g = GradNormWeighting(["a", "b"], alpha=0.5, lr=0.3)
    for _ in range(5):
        step(model, g)
        model.zero_grad()
        assert float(g.task_weights.detach().sum()) == pytest.approx(2.0, abs=1e-6)


def test_gradnorm_state_round_trips_with_its_optimizer():
    model = toy_model()
    g = GradNormWeighting(["a", "b"], lr=0.1)
    step(model, g)
    state = g.state_dict()
    fresh = GradNormWeighting(["a", "b"], lr=0.1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.task_weights, g.task_weights) and torch.equal(fresh.initial_losses, g.initial_losses)
    model2 = toy_model()
    step(model, g)
    step(model2, fresh)
    assert torch.equal(fresh.task_weights, g.task_weights), "Adam's moments must be restored too"


# ----- bad input --------------------------------------------------------------------------------
def test_gradnorm_without_a_shared_layer():
    with pytest.raises(ConfigError, match="last shared layer"):
        GradNormWeighting(["a", "b"]).backward({"a": torch.tensor(1.0, requires_grad=True),
                                                 "b": torch.tensor(2.0, requires_grad=True)}, shared_params=[])


def test_mgda_ub_with_an_output_that_does_not_require_grad():
    model = toy_model()
    model.encoder.requires_grad_(False)
    with pytest.raises(ConfigError, match="does not require grad"):
        step(model, build_weighting("mgda_ub", ["a", "b"]))


def test_mgda_ub_with_per_task_representations():
    w = build_weighting("mgda_ub", ["a", "b"])
    loss = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ConfigError, match="one tensor"):
        w.backward({"a": loss, "b": loss}, rep={"a": torch.ones(1), "b": torch.ones(1)})


@pytest.mark.parametrize("name, options, message", [
    ("mgda", {"normalization": "l3"}, "unknown gradient normalisation 'l3'"),
    ("mgda_ub", {"normalization": "max"}, "unknown gradient normalisation 'max'"),
    ("gradnorm", {"alpha": -1.0}, "alpha must be >= 0"),
    ("gradnorm", {"gamma": 2.0}, "bad options for weighting 'gradnorm'"),
])
def test_unknown_method_options(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_weighting(name, ["a", "b"], **options)


@pytest.mark.parametrize("name", ["gradnorm", "mgda", "mgda_ub"])
def test_fp16_is_refused_for_gradient_methods(name):
    class FakeAccelerator:
        mixed_precision = "fp16"
        num_processes = 1

    with pytest.raises(ConfigError, match="use mixed_precision='bf16'"):
        build_weighting(name, ["a", "b"]).bind(FakeAccelerator())


def test_mgda_ub_accepts_a_list_of_feature_maps():
    """Dense encoders give [input, f1, f2, ...]; parts without grad (the input) are skipped."""
    model = toy_model()
    outputs, z = model(X, return_rep=True)
    losses = {t: outputs[t].sum() for t in ("a", "b")}
    weights = build_weighting("mgda_ub", ["a", "b"]).backward(losses, rep=[X, z])
    assert weights == pytest.approx({"a": 0.8, "b": 0.2}, abs=1e-6)
    assert torch.allclose(model.encoder.weight.grad, torch.outer(torch.tensor([0.8, 0.4]), X[0]), atol=1e-6)


class Nested(nn.Module):
    """An encoder returning nested feature maps: z1 = W1 x, z2 = W2 z1 (like an smp encoder's list)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(2, 2, bias=False)
        self.second = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 2.0]]))
            self.second.weight.copy_(torch.tensor([[0.3, -1.0], [0.7, 0.2]]))

    def forward(self, x):
        z1 = self.first(x)
        return [z1, self.second(z1)]


class Reads(nn.Module):
    def __init__(self, u, v):
        super().__init__()
        self.u, self.v = torch.tensor(u), torch.tensor(v)

    def forward(self, maps):
        return (maps[0] @ self.u + maps[1] @ self.v) ** 2


class ScaledReads(Reads):
    """``Reads`` with a learned scale: a head with a parameter of its own."""

    def __init__(self, u, v):
        super().__init__(u, v)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.backward_passes = 0  # backward passes through this head

    def forward(self, maps):
        inner = super().forward(maps)
        if inner.requires_grad:
            inner.register_hook(lambda grad: setattr(self, "backward_passes", self.backward_passes + 1))
        return self.scale * inner


def nested_model(head=Reads):
    return MultiTaskModel(Nested(), {"a": head([1.0, 0.0], [0.0, 1.0]), "b": head([0.0, 2.0], [1.0, 1.0])})


@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "batched"])
def test_mgda_ub_on_nested_feature_maps_gives_every_encoder_weight_the_weighted_gradient(batched):
    model = nested_model(ScaledReads)
    outputs, rep = model(X, return_rep=True)
    losses = {t: outputs[t].sum() for t in ("a", "b")}
    weights = build_weighting("mgda_ub", ["a", "b"], batched=batched).backward(losses, rep=rep)
    alpha = [weights["a"], weights["b"]]
    assert 0 < alpha[0] < 1
    # reference: the gradient of the alpha-weighted sum, from a fresh forward pass
    reference = nested_model(ScaledReads)
    out = reference(X)
    (alpha[0] * out["a"].sum() + alpha[1] * out["b"].sum()).backward()
    for name in ("first", "second"):
        got = getattr(model.encoder, name).weight.grad
        want = getattr(reference.encoder, name).weight.grad
        assert torch.allclose(got, want, atol=1e-5), name
    # the heads: their own task's gradient, unweighted
    for t, a in zip(("a", "b"), alpha):
        assert torch.allclose(model.heads[t].scale.grad, reference.heads[t].scale.grad / a, atol=1e-5), t


def test_mgda_ub_runs_each_head_backward_once_per_step():
    """The per-task passes give the heads their gradients: the encoder pass must not go through them again."""
    model = nested_model(ScaledReads)
    outputs, rep = model(X, return_rep=True)
    build_weighting("mgda_ub", ["a", "b"]).backward({t: outputs[t].sum() for t in ("a", "b")}, rep=rep)
    assert [model.heads[t].backward_passes for t in ("a", "b")] == [1, 1]
    assert model.heads["a"].scale.grad is not None and model.encoder.first.weight.grad is not None


def test_walk_to_boundary_finds_the_heads_and_the_maps_they_read():
    model = nested_model(ScaledReads)
    outputs, rep = model(X, return_rep=True)
    losses = [outputs["a"].sum(), outputs["b"].sum()]
    extra = torch.zeros(1, 2, requires_grad=True)  # a map returned but read by no head
    leaves, reached = walk_to_boundary(losses, [rep[0], extra, rep[1]])
    assert {id(p) for p in leaves} == {id(model.heads["a"].scale), id(model.heads["b"].scale)}
    assert [id(z) for z in reached] == [id(rep[0]), id(rep[1])]
    # without a boundary every leaf is reached, the encoder's weights included
    leaves, _ = walk_to_boundary(losses, [])
    assert len(leaves) == 4
