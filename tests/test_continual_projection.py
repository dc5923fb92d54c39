"""GEM and A-GEM (continual.projection) against their formulas, an independent QP solver, and the Trainer."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from continual.projection import AGEMWeighting, GEMWeighting, gem_dual
from mtl.config import TrainerConfig
from mtl.errors import ConfigError, SolverError
from mtl.model import MultiTaskModel
from mtl.objective import Objective
from mtl.tasks import classification_task
from mtl.trainer import Trainer

from conftest import TwoTaskDigits


def project(cls, g, G, **options):
    """Run ``cls`` on losses linear in one parameter vector w, whose gradients are exactly g and G's rows.

    Returns the gradient written to w, the returned weights and the recorded projection.
    """
    w = nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
    weighting = cls(parameters=lambda: [w], **options)
    memory = G @ w if cls is GEMWeighting else G[0] @ w
    weights = weighting.backward({"current": g @ w, "memory": memory})
    return w.grad, weights, weighting.last_projection


def conflicting(gen, k, P):
    """Random g (P,) and G (k, P) with at least one negative G_i . g."""
    g = torch.randn(P, generator=gen, dtype=torch.float64)
    G = torch.randn(k, P, generator=gen, dtype=torch.float64)
    if (G @ g >= 0).all():
        G[0] = -G[0]
    return g, G


def primal_qp(g, G):
    """min ||x - g||^2 s.t. G x >= 0, by SLSQP: independent of the dual/NNLS route under test."""
    g_np, G_np = g.numpy(), G.numpy()
    result = minimize(lambda x: 0.5 * np.sum((x - g_np) ** 2), np.zeros_like(g_np), jac=lambda x: x - g_np,
                      constraints=[{"type": "ineq", "fun": lambda x: G_np @ x, "jac": lambda x: G_np}],
                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success, result.message
    return torch.from_numpy(result.x)


# ----- A-GEM ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_agem_projects_conflicting_gradients_onto_the_memory_half_space(seed):
    gen = torch.Generator().manual_seed(seed)
    g, g_ref = conflicting(gen, 1, 12)
    grad, weights, projection = project(AGEMWeighting, g, g_ref)
    dot, ref = float(g @ g_ref[0]), float(g_ref[0] @ g_ref[0])
    expected = g - dot / ref * g_ref[0]  # Chaudhry et al. 2019, eq. 11
    assert torch.allclose(grad, expected, atol=1e-12)
    assert float(grad @ g_ref[0]) >= -1e-10 and float(grad @ g_ref[0]) == pytest.approx(0.0, abs=1e-10)
    assert weights == {"current": 1.0, "memory": pytest.approx(-dot / ref)}
    assert projection.projected and projection.dots_before == (pytest.approx(dot),)
    assert projection.dots_after[0] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_agem_keeps_g_when_it_agrees_with_the_memory(seed):
    gen = torch.Generator().manual_seed(seed)
    g, g_ref = conflicting(gen, 1, 12)
    grad, weights, projection = project(AGEMWeighting, g, -g_ref)  # now g . g_ref > 0
    assert torch.equal(grad, g)
    assert weights == {"current": 1.0, "memory": 0.0} and not projection.projected


def test_agem_without_memory_is_plain_sgd():
    # a memory loss that depends on no parameter (nothing stored yet) gives no constraint
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    weighting = AGEMWeighting(parameters=lambda: [w])
    weights = weighting.backward({"current": (w ** 2).sum(), "memory": torch.zeros(())})
    assert torch.equal(w.grad, torch.tensor([2.0, -4.0])) and weights["memory"] == 0.0
    assert not weighting.last_projection.projected


def test_agem_writes_the_projected_gradient_of_a_real_linear_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(3, 2), "unused": nn.Linear(2, 1)})  # a head neither loss reaches
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    with torch.no_grad():  # memory targets mirrored around the current prediction: a conflicting g_ref
        x_mem, y_mem = x + 0.1 * torch.randn(8, 3), 2 * model["body"](x) - y + 0.1 * torch.randn(8, 2)

    def losses(m):
        return (F.mse_loss(m["body"](x), y), F.mse_loss(m["body"](x_mem), y_mem))

    reference = copy.deepcopy(model)
    current, memory = losses(reference)
    g = torch.cat([t.flatten() for t in torch.autograd.grad(current, list(reference["body"].parameters()))])
    g_ref = torch.cat([t.flatten() for t in torch.autograd.grad(memory, list(reference["body"].parameters()))])
    assert g @ g_ref < 0
    expected = g - (g @ g_ref) / (g_ref @ g_ref) * g_ref

    weighting = AGEMWeighting(parameters=model.parameters)
    current, memory = losses(model)
    weights = weighting.backward({"current": current, "memory": memory})
    body = model["body"]
    assert torch.allclose(torch.cat([body.weight.grad.flatten(), body.bias.grad.flatten()]), expected, atol=1e-6)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model["unused"].parameters())
    assert weights["memory"] == pytest.approx(float(-(g @ g_ref) / (g_ref @ g_ref)), rel=1e-5)


# ----- GEM --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(4))
def test_gem_update_satisfies_every_constraint_and_solves_the_primal_qp(k, seed):
    gen = torch.Generator().manual_seed(100 * k + seed)
    g, G = conflicting(gen, k, 10)
    grad, weights, projection = project(GEMWeighting, g, G)
    assert (G @ grad >= -1e-8).all(), G @ grad
    assert torch.allclose(grad, primal_qp(g, G), atol=1e-5)
    v = torch.tensor(projection.coefficients, dtype=torch.float64)
    assert projection.projected and (v >= 0).all()
    assert torch.allclose(grad, g + G.T @ v, atol=1e-12)  # g~ = G^T v + g
    assert torch.allclose(v * (G @ grad), torch.zeros(k, dtype=torch.float64), atol=1e-8)  # complementary slackness
    assert weights == {"current": 1.0, "memory": pytest.approx(float(v.sum()))}
    assert projection.dots_before == pytest.approx((G @ g).tolist())
    assert projection.dots_after == pytest.approx((G @ grad).tolist(), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_gem_with_one_past_experience_is_agem(seed):
    gen = torch.Generator().manual_seed(seed)
    g, G = conflicting(gen, 1, 7)
    gem, gem_weights, _ = project(GEMWeighting, g, G)
    agem, agem_weights, _ = project(AGEMWeighting, g, G)
    assert torch.allclose(gem, agem, atol=1e-12)
    assert gem_weights["memory"] == pytest.approx(agem_weights["memory"])


def test_gem_with_a_singular_memory_gram_matrix():
    # repeated and zero memory gradients, and more constraints than dimensions (k = 6 > P = 4)
    gen = torch.Generator().manual_seed(7)
    g, G = conflicting(gen, 3, 4)
    G = torch.cat([G, G[:1], torch.zeros(1, 4, dtype=torch.float64), 2 * G[1:2]])
    grad, _, _ = project(GEMWeighting, g, G)
    assert (G @ grad >= -1e-8).all()
    assert torch.allclose(grad, primal_qp(g, G), atol=1e-5)


def test_gem_with_memory_gradients_of_very_different_sizes():
    # |G_i| from 1e-4 to 1e4: G G^T's condition number is 1e16, yet every constraint must hold
    gen = torch.Generator().manual_seed(5)
    g, G = conflicting(gen, 5, 8)
    G = G * torch.logspace(-4, 4, 5, dtype=torch.float64)[:, None]
    grad, _, _ = project(GEMWeighting, g, G)
    unit = G / G.norm(dim=1, keepdim=True)  # same constraints, well scaled for the reference solver
    assert (unit @ grad >= -1e-10).all(), unit @ grad
    assert torch.allclose(grad, primal_qp(g, unit), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_gem_margin_is_a_lower_bound_on_the_dual_variables(seed):
    gen = torch.Generator().manual_seed(seed)
    g, G = conflicting(gen, 3, 10)
    grad, _, projection = project(GEMWeighting, g, G, margin=0.5)
    v = np.array(projection.coefficients)
    A, c = (G @ G.T).numpy(), (G @ g).numpy()
    independent = minimize(lambda u: 0.5 * u @ A @ u + c @ u, np.full(3, 0.5), jac=lambda u: A @ u + c,
                           bounds=[(0.5, None)] * 3, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    assert np.allclose(v, independent.x, atol=1e-5) and (v >= 0.5).all()
    assert (G @ grad >= -1e-8).all()


def test_gem_keeps_g_without_conflict_or_without_past_experiences():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    G = torch.stack([g + 0.1 * torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)])
    assert (G @ g > 0).all()
    for memory in (G, torch.zeros(0, 6, dtype=torch.float64)):  # agreeing memories; first experience
        grad, weights, projection = project(GEMWeighting, g, memory, margin=0.5)
        assert torch.equal(grad, g) and weights["memory"] == 0.0 and not projection.projected


def test_gem_dual_solves_the_qp_it_documents():
    gen = torch.Generator().manual_seed(11)
    g, G = conflicting(gen, 4, 9)
    v = gem_dual(G @ G.T, G @ g)
    assert v.dtype == torch.float64 and (v >= 0).all()
    assert torch.allclose(g + G.T @ v, primal_qp(g, G), atol=1e-5)


# ----- in the Trainer ---------------------------------------------------------------------
class ReplayObjective(Objective):
    """Current loss on head "a"; memory loss on stored images whose labels conflict with the current ones."""

    loss_names = ["current", "memory"]

    def __init__(self, memory_x, memory_y):
        super().__init__()
        self.register_buffer("memory_x", memory_x)
        self.register_buffer("memory_y", memory_y)

    def losses(self, model, batch):
        x, y = batch
        current = F.cross_entropy(model(x, tasks=["a"])["a"], y["a"])
        memory = F.cross_entropy(model(self.memory_x, tasks=["a"])["a"], self.memory_y)
        return {"current": current, "memory": memory}, None


@pytest.mark.parametrize("cls", [AGEMWeighting, GEMWeighting])
def test_one_trainer_step_applies_the_projected_gradient(cls, tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel(nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh()),
                           {"a": nn.Linear(16, 10), "b": nn.Linear(16, 10)})
    data = TwoTaskDigits(16, seed=1)
    objective = ReplayObjective(data.x[:8].clone(), (data.a[:8] + 5) % 10)
    # the expected step, computed independently on a copy: one full batch, plain SGD
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    losses, _ = objective.losses(reference, (data.x, {"a": data.a, "b": data.b}))
    g, g_ref = (torch.cat([t.flatten() if t is not None else torch.zeros_like(p).flatten()
                           for t, p in zip(torch.autograd.grad(losses[name], params, allow_unused=True), params)])
                for name in ("current", "memory"))
    assert g @ g_ref < 0  # the case worth testing: the step is projected
    coefficient = float(-(g @ g_ref) / (g_ref @ g_ref))
    expected = torch.cat([p.detach().flatten() for p in params]) - 0.1 * (g + coefficient * g_ref)

    weighting = cls(parameters=model.parameters)
    config = TrainerConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0, progress=False,
                           tensorboard=False, cpu=True)
    trainer = Trainer(model, [classification_task("a", 10)], weighting, data, None, config, tmp_path,
                      objective=objective)
    history = trainer.fit()
    assert trainer.progress.step == 1 and weighting.last_projection.projected
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(after, expected, atol=1e-6)
    assert history["epochs"][0]["weights"] == {"current": 1.0, "memory": pytest.approx(coefficient, rel=1e-4)}


# ----- user mistakes ----------------------------------------------------------------------
def test_bad_construction_is_refused_with_the_fix():
    w = nn.Parameter(torch.zeros(2))
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match=r"\['a', 'b'\]"):
        AGEMWeighting(["a", "b"], parameters=model.parameters)
    with pytest.raises(ConfigError, match="exactly the losses"):
        GEMWeighting(["current", "current"], parameters=model.parameters)
    for bad in (model.parameters(), [w], model):
        with pytest.raises(ConfigError, match="model.parameters"):
            GEMWeighting(parameters=bad)
    for margin in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="margin"):
            GEMWeighting(parameters=model.parameters, margin=margin)
    # the order of the names does not matter
    assert GEMWeighting(("memory", "current"), parameters=model.parameters).task_names == ["current", "memory"]


def test_fp16_is_refused_at_bind():
    accelerator = types.SimpleNamespace(mixed_precision="fp16", num_processes=1)
    with pytest.raises(ConfigError, match="bf16"):
        AGEMWeighting(parameters=nn.Linear(2, 1).parameters).bind(accelerator)


def test_bad_losses_are_refused_with_the_fix():
    w = nn.Parameter(torch.ones(3))
    agem, gem = AGEMWeighting(parameters=lambda: [w]), GEMWeighting(parameters=lambda: [w])
    current = w.sum()
    with pytest.raises(ConfigError, match="memory"):
        agem.backward({"current": current})
    with pytest.raises(ConfigError, match=r"shape \(3,\).*GEMWeighting"):
        agem.backward({"current": current, "memory": w * 2})
    with pytest.raises(ConfigError, match=r"shape \(3, 3\)"):
        gem.backward({"current": current, "memory": torch.outer(w, w)})
    with pytest.raises(ConfigError, match=r"current.*shape \(3,\)"):
        gem.backward({"current": w * 1.0, "memory": current})
    with pytest.raises(ConfigError, match="torch.zeros"):
        gem.backward({"current": current, "memory": None})
    with pytest.raises(ConfigError, match="no_grad"):
        gem.backward({"current": current.detach(), "memory": current})
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        GEMWeighting(parameters=lambda: [frozen]).backward({"current": current, "memory": current})


def test_non_finite_gradients_are_reported():
    w = nn.Parameter(torch.zeros(2))
    weighting = AGEMWeighting(parameters=lambda: [w])
    # finite losses, infinite gradient: d sqrt(|w|)/dw at w = 0
    with pytest.raises(SolverError, match=r"memory\[0\].*not finite"):
        weighting.backward({"current": w.sum(), "memory": w.abs().sqrt().sum()})
