"""The min-norm solver behind MGDA (mtl/weighting/min_norm.py), against an exact QP.

The reference answers min a^T G a over the simplex two independent ways, both in
NumPy/SciPy and both checked, not trusted:
- small T (<= 10): enumeration of every support S, solving the stationarity system
  [[G_SS, 1], [1^T, 0]] on each and keeping the best feasible point (the optimum is
  stationary on the face of its support, so this is exact);
- any T: scipy SLSQP, polished by an active-set pass on its support;
and every reference point must pass the KKT conditions / Frank-Wolfe duality gap.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtl.errors import ConfigError, MultisupError, SolverError
from mtl.weighting import min_norm
from mtl.weighting.min_norm import NORMALIZATIONS, min_norm_weights, normalization_scales, solve


# --- the reference -------------------------------------------------------------------------------


def fw_gap(G: np.ndarray, a: np.ndarray) -> float:
    """Frank-Wolfe duality gap: an upper bound on a^T G a - min."""
    v = G @ a
    return 2.0 * float(a @ v - v.min())


def assert_certified(G: np.ndarray, a: np.ndarray, rel: float = 1e-10) -> None:
    """KKT of the simplex QP, up to rounding: feasible, and no vertex direction that descends."""
    assert a.min() >= -1e-13 and abs(a.sum() - 1.0) <= 1e-12
    f = float(a @ G @ a)
    norms = np.sqrt(np.clip(np.diag(G), 0, None))
    floor = 1e-13 * float(norms @ np.abs(a)) ** 2 + 1e-13 * float(norms.max() * (norms @ np.abs(a)))
    assert fw_gap(G, a) <= rel * f + floor, (fw_gap(G, a), f, floor)


def face_solution(G: np.ndarray, S: list[int]) -> tuple[np.ndarray, float]:
    """Minimiser of a^T G a on the affine hull of the face S: [[G_SS, 1], [1^T, 0]] [a; -lam] = [0; 1]."""
    r = len(S)
    K = np.zeros((r + 1, r + 1))
    K[:r, :r] = G[np.ix_(S, S)]
    K[:r, r] = K[r, :r] = 1.0
    rhs = np.zeros(r + 1)
    rhs[r] = 1.0
    sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    return sol[:r], -sol[r]


def reference_enumerate(G: np.ndarray) -> np.ndarray:
    T = len(G)
    best, best_f = None, math.inf
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            aS, _ = face_solution(G, list(S))
            if aS.min() < -1e-12 or abs(aS.sum() - 1.0) > 1e-9:
                continue
            a = np.zeros(T)
            a[list(S)] = np.clip(aS, 0, None)
            a /= a.sum()
            f = float(a @ G @ a)
            if f < best_f:
                best, best_f = a, f
    return best


def reference_slsqp(G: np.ndarray) -> np.ndarray:
    T = len(G)
    res = minimize(lambda a: a @ G @ a, np.full(T, 1.0 / T), jac=lambda a: 2 * G @ a, method="SLSQP",
                   bounds=[(0.0, 1.0)] * T, options={"ftol": 1e-16, "maxiter": 2000},
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(T)}])
    a = np.clip(res.x, 0, None)
    S = sorted(np.flatnonzero(a > 1e-7 * a.max()).tolist())
    # Active-set polish: exact face solution on SLSQP's support, then drop/add until the KKT conditions hold.
    for _ in range(4 * T):
        aS, lam = face_solution(G, S)
        if aS.min() < 0:
            S.pop(int(np.argmin(aS)))
            continue
        a = np.zeros(T)
        a[S] = aS
        mu = G @ a - lam
        out = [j for j in range(T) if j not in S]
        if out and mu[out].min() < -1e-13 * abs(lam):
            S = sorted(S + [out[int(np.argmin(mu[out]))]])
            continue
        break
    return a / a.sum()


def reference(G: np.ndarray) -> np.ndarray:
    a = reference_enumerate(G) if len(G) <= 10 else reference_slsqp(G)
    assert_certified(G, a)
    return a


def correlated_gradients(T: int, D: int, seed: int, shared: float = 1.0, scale_sd: float = 0.5) -> np.ndarray:
    """g_t = (shared * s + noise_t) * exp(scale_sd * z_t): related tasks, unequal gradient norms."""
    rng = np.random.default_rng(seed)
    M = shared * rng.standard_normal(D) + rng.standard_normal((T, D))
    return M * np.exp(scale_sd * rng.standard_normal((T, 1)))


def weights(G, **kw) -> np.ndarray:
    a = min_norm_weights(torch.as_tensor(G, dtype=torch.float64), **kw).numpy()
    assert_on_simplex(a)
    return a


def assert_on_simplex(a) -> None:
    a = np.asarray(a, dtype=np.float64)
    assert np.isfinite(a).all() and a.min() >= 0.0 and abs(a.sum() - 1.0) <= 1e-6, a


def objective(G, a) -> float:
    return float(np.asarray(a, np.float64) @ G @ np.asarray(a, np.float64))


# --- the reference itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("T,seed", [(3, 0), (5, 1), (8, 2)])
def test_the_two_references_agree(T, seed):
    M = correlated_gradients(T, 3 * T, seed)
    G = M @ M.T
    a, b = reference_enumerate(G), reference_slsqp(G)
    assert_certified(G, a)
    assert_certified(G, b)
    assert np.abs(a - b).sum() < 1e-8


# --- accuracy against the exact QP ----------------------------------------------------------------------------

CASES = [(T, D, seed, shared, sd)
         for T in (2, 3, 5, 10)
         for seed, (D, shared, sd) in enumerate([(64, 1.0, 0.5), (200, 3.0, 0.0), (32, 0.3, 1.0), (500, 1.0, 0.0)])]
CASES += [(40, D, seed, shared, sd) for seed, (D, shared, sd) in enumerate([(200, 1.0, 0.5), (400, 3.0, 0.0),
                                                                             (120, 0.3, 1.0)])]


@pytest.mark.parametrize("T,D,seed,shared,sd", CASES)
def test_matches_exact_qp(T, D, seed, shared, sd):
    M = correlated_gradients(T, D, seed, shared, sd)
    G = M @ M.T
    ref = reference(G)
    a = weights(G)
    assert np.abs(a - ref).sum() <= 1e-4
    f, f_ref = objective(G, a), objective(G, ref)
    assert abs(f - f_ref) <= 1e-7 * f_ref
    assert_certified(G, a)  # ours is itself a KKT point, not merely close to one


def test_float32_and_bf16_inputs_answer_float32_and_are_solved_in_float64():
    M = correlated_gradients(5, 64, 7)
    G64 = torch.as_tensor(M @ M.T)
    G32 = G64.float()
    a32 = min_norm_weights(G32)
    assert a32.dtype == torch.float32 and a32.device == G32.device
    ref = reference(G32.double().numpy())  # the problem as handed over, in float64
    assert np.abs(a32.double().numpy() - ref).sum() <= 1e-6
    ab = min_norm_weights(G64.bfloat16())
    assert ab.dtype == torch.float32
    assert_on_simplex(ab.numpy())
    assert min_norm_weights(G64).dtype == torch.float64


def test_input_is_not_modified_and_may_require_grad():
    M = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    G = M @ M.T
    before = G.detach().clone()
    a = min_norm_weights(G)
    assert not a.requires_grad
    assert torch.equal(G.detach(), before)


# --- hand-checked cases -------------------------------------------------------------------------------------


def gram_of(*vectors) -> torch.Tensor:
    M = torch.tensor(vectors, dtype=torch.float64)
    return M @ M.T


def test_two_orthogonal_unit_vectors_weigh_half_each():
    assert min_norm_weights(gram_of([1.0, 0.0], [0.0, 1.0])).tolist() == [0.5, 0.5]


def test_two_vectors_interior_point_by_hand():
    # g1 = (1, 0), g2 = (0, 2): alpha_1 = G22 / (G11 + G22) = 4/5; the point (0.8, 0.4), norm^2 0.8.
    a = min_norm_weights(gram_of([1.0, 0.0], [0.0, 2.0]))
    assert a.tolist() == pytest.approx([0.8, 0.2], abs=1e-15)


@pytest.mark.parametrize("order", [0, 1])
def test_a_dominated_vector_gives_a_vertex(order):
    # g1 = (1, 0), g2 = (3, 1): <g1, g2 - g1> = 2 >= 0, so g1 itself is the min-norm point.
    vecs = [[1.0, 0.0], [3.0, 1.0]]
    if order:
        vecs.reverse()
    a = min_norm_weights(gram_of(*vecs)).tolist()
    assert a == ([1.0, 0.0] if order == 0 else [0.0, 1.0])


def test_three_vectors_by_hand():
    # e1, e2 and (1, 1): the hull's nearest point to 0 is (1/2, 1/2) = e1/2 + e2/2 (norm^2 1/2); the third
    # vector is not needed (any weight on it moves the point away from the origin).
    a = min_norm_weights(gram_of([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]))
    assert a.tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-12)


def test_identical_vectors():
    g = [0.3, -1.2, 2.0]
    G = gram_of(g, g)
    assert min_norm_weights(G).tolist() == [0.5, 0.5]  # every point is optimal: the symmetric one
    # Among others: any valid simplex point with the right objective (||g||^2 here: g is the smallest).
    G4 = gram_of(g, [1.0, 2.0, 3.0], g, [2.0, 0.0, 1.0]).numpy()
    a = weights(G4)
    assert objective(G4, a) == pytest.approx(objective(G4, reference(G4)), rel=1e-9)
    # Nearly identical: ||g1 - g2||^2 ~ 1e-18 ||g||^2 is rounding noise; the shorter one is the answer.
    G = gram_of(g, [x * (1 + 1e-9) for x in g])
    assert min_norm_weights(G).tolist() == [1.0, 0.0]


# --- degenerate cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_single_task_gets_weight_one(dtype):
    a = min_norm_weights(torch.tensor([[2.5]], dtype=dtype))
    assert a.tolist() == [1.0] and a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("T,zero", [(2, 1), (3, 0), (6, 4)])
def test_a_zero_gradient_takes_all_the_weight(T, zero):
    M = correlated_gradients(T, 10, T)
    M[zero] = 0.0
    a = min_norm_weights(torch.as_tensor(M @ M.T)).tolist()
    assert a == [1.0 if t == zero else 0.0 for t in range(T)]


@pytest.mark.parametrize("T,D", [(6, 2), (10, 3), (12, 5)])
def test_rank_deficient_gram(T, D):
    # More tasks than dimensions (+1): affinely dependent gradients, a singular Gram matrix, many optima.
    M = correlated_gradients(T, D, T + D, shared=2.0)
    G = M @ M.T
    a = weights(G)
    scale = np.diag(G).max()
    assert objective(G, a) <= objective(G, reference(G)) + 1e-12 * scale


def test_origin_inside_the_hull():
    G = gram_of([1.0, 0.0], [-1.0, 0.5], [0.0, -1.0], [3.0, 3.0]).numpy()  # 0 is a convex combination
    a = weights(G)
    assert objective(G, a) <= 1e-14 * np.diag(G).max()


def test_very_different_scales():
    rng = np.random.default_rng(3)
    M = rng.standard_normal((5, 30)) * np.array([[1e-4], [1.0], [1e4], [3e2], [1e-2]])
    G = M @ M.T
    ref = reference(G)
    a = weights(G)
    assert abs(objective(G, a) - objective(G, ref)) <= 1e-7 * objective(G, ref)
    assert np.abs(a - ref).sum() <= 1e-4


def test_nearly_cancelling_gradients():
    # g3 ~ -(g1 + g2)/2: a tiny min-norm value, resolved relative to itself.
    rng = np.random.default_rng(4)
    g1, g2 = rng.standard_normal(50), rng.standard_normal(50)
    M = np.stack([g1, g2, -(g1 + g2) / 2 + 1e-4 * rng.standard_normal(50), rng.standard_normal(50)])
    G = M @ M.T
    ref = reference(G)
    a = weights(G)
    assert abs(objective(G, a) - objective(G, ref)) <= 1e-7 * objective(G, ref)


def test_weights_always_on_the_simplex():
    rng = np.random.default_rng(5)
    for trial in range(60):
        T = int(rng.integers(1, 14))
        D = int(rng.integers(1, 40))
        M = rng.standard_normal((T, D)) * np.exp(2 * rng.standard_normal((T, 1)))
        if trial % 4 == 0:
            M[rng.integers(T)] = M[rng.integers(T)]  # a duplicate
        if trial % 7 == 0:
            M[rng.integers(T)] = 0.0
        G = M @ M.T
        for dtype in (torch.float64, torch.float32):
            a = min_norm_weights(torch.as_tensor(G).to(dtype)).double().numpy()
            assert_on_simplex(a)
            assert objective(G, a) <= np.diag(G).min() * (1 + 1e-5) + 1e-12 * np.diag(G).max()


def test_iteration_cap_still_gives_a_valid_point():
    M = correlated_gradients(40, 200, 11, shared=0.3, scale_sd=1.0)
    G = M @ M.T
    a = weights(G, max_iter=1)
    assert objective(G, a) <= np.diag(G).min() + 1e-12


def test_frank_wolfe_fallback_converges_towards_the_optimum():
    # Algorithm 2 of Sener & Koltun, used when the exact pivoting cannot certify its answer.
    M = correlated_gradients(5, 20, 12)
    G = M @ M.T
    ref = reference(G)
    start = [1.0 / 5] * 5
    a = np.array(min_norm._frank_wolfe(torch.as_tensor(G), start, 5000, 1e-10))
    assert_on_simplex(a)
    assert objective(G, a) - objective(G, ref) <= 1e-6 * objective(G, ref)
    few = np.array(min_norm._frank_wolfe(torch.as_tensor(G), start, 3, 1e-10))
    assert objective(G, ref) <= objective(G, few) <= objective(G, start)


def test_fallback_path_when_pivoting_fails(monkeypatch):
    monkeypatch.setattr(min_norm, "_block_pivoting", lambda *args: None)
    M = correlated_gradients(6, 30, 13)
    G = M @ M.T
    a = weights(G, max_iter=20000)
    assert objective(G, a) - objective(G, reference(G)) <= 1e-6 * objective(G, reference(G))


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gram_raises(bad):
    G = gram_of([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    G[1, 2] = G[2, 1] = bad
    with pytest.raises(SolverError, match="non-finite") as e:
        min_norm_weights(G)
    assert isinstance(e.value, ValueError) and isinstance(e.value, MultisupError)
    G = gram_of([1.0, 0.0], [0.0, 1.0])
    G[0, 0] = bad
    with pytest.raises(SolverError, match="non-finite"):
        min_norm_weights(G)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 2, 2), (0, 0)])
def test_non_square_gram_raises(shape):
    with pytest.raises(SolverError, match="square"):
        min_norm_weights(torch.ones(shape))


def test_non_symmetric_gram_raises():
    G = gram_of([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    G[0, 2] += 0.5
    with pytest.raises(SolverError, match="not symmetric"):
        min_norm_weights(G)
    G2 = gram_of([1.0, 0.0], [1.0, 1.0])
    G2[1, 0] = 0.0
    with pytest.raises(SolverError, match="not symmetric"):
        min_norm_weights(G2)
    # Rounding-level asymmetry (two dot products summed in different orders) is accepted.
    G = gram_of([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    G[0, 2] += 1e-9
    assert_on_simplex(min_norm_weights(G).numpy())
    G2 = gram_of([1.0, 0.0], [1.0, 1.0])
    G2[1, 0] += 1e-9
    assert min_norm_weights(G2).tolist() == pytest.approx([1.0, 0.0], abs=1e-8)


def test_not_a_gram_matrix_raises():
    with pytest.raises(SolverError, match="negative diagonal"):
        min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(SolverError, match="positive semidefinite"):
        min_norm_weights(torch.tensor([[1.0, -2.0], [-2.0, 1.0]]))
    with pytest.raises(SolverError, match="positive semidefinite"):
        min_norm_weights(torch.tensor([[1.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_bad_options_raise():
    G = gram_of([1.0, 0.0], [0.0, 1.0])
    for kw in ({"max_iter": 0}, {"max_iter": 2.5}, {"tol": -1.0}, {"tol": math.nan}):
        with pytest.raises(ConfigError):
            min_norm_weights(G, **kw)
    with pytest.raises(SolverError, match="torch.Tensor"):
        min_norm_weights([[1.0]])


# --- gradient normalisation ------------------------------------------------------------------------------


def test_normalization_scales_by_hand():
    norms, losses = torch.tensor([2.0, 1.0]), [4.0, 0.5]
    assert normalization_scales("none", norms, losses).tolist() == [1.0, 1.0]
    assert normalization_scales("l2", norms).tolist() == [2.0, 1.0]
    assert normalization_scales("loss", norms, losses).tolist() == [4.0, 0.5]
    assert normalization_scales("loss+", norms, torch.tensor(losses)).tolist() == [8.0, 0.5]


def test_each_normalization_mode_by_hand():
    # g1 = (2, 0), g2 = (0, 1), losses 4 and 0.5. Orthogonal vectors a, b: alpha_1 = |b|^2 / (|a|^2 + |b|^2).
    G = gram_of([2.0, 0.0], [0.0, 1.0])
    losses = torch.tensor([4.0, 0.5])
    expected = {
        "none": [1 / 5, 4 / 5],             # |g1|^2 = 4, |g2|^2 = 1
        "l2": [0.5, 0.5],                   # unit vectors
        "loss": [4 / 4.25, 0.25 / 4.25],    # g1 / 4 = (0.5, 0), g2 / 0.5 = (0, 2)
        "loss+": [64 / 65, 1 / 65],         # g1 / 8 = (0.25, 0), g2 / 0.5 = (0, 2)
    }
    assert set(expected) == set(NORMALIZATIONS)
    for mode, want in expected.items():
        assert solve(G, losses, normalization=mode).tolist() == pytest.approx(want, abs=1e-14), mode


def test_l2_normalization_non_orthogonal_by_hand():
    # g1 = (3, 4) (norm 5), g2 = (1, 0): unit vectors (0.6, 0.8), (1, 0) have equal norms, so the midpoint.
    G = gram_of([3.0, 4.0], [1.0, 0.0])
    assert solve(G, normalization="l2").tolist() == pytest.approx([0.5, 0.5], abs=1e-14)
    assert solve(G).tolist() == pytest.approx(min_norm_weights(G).tolist(), abs=0)


def test_normalization_agrees_with_normalizing_the_gradients():
    M = correlated_gradients(5, 40, 21)
    losses = np.array([0.7, 2.0, 0.1, 1.3, 5.0])
    G = torch.as_tensor(M @ M.T)
    n = np.linalg.norm(M, axis=1)
    for mode, s in {"l2": n, "loss": losses, "loss+": losses * n}.items():
        Mn = M / s[:, None]
        want = reference(Mn @ Mn.T)
        got = solve(G, losses.tolist(), normalization=mode).numpy()
        assert np.abs(got - want).sum() <= 1e-6, mode


def test_normalization_edge_cases():
    G = gram_of([2.0, 0.0], [0.0, 0.0], [0.0, 1.0])  # task 1 has a zero gradient
    # l2: a zero norm cannot divide; the zero vector stays zero and takes all the weight.
    assert solve(G, normalization="l2").tolist() == [0.0, 1.0, 0.0]
    # A loss of exactly 0: scale 1 (documented), never NaN.
    assert normalization_scales("loss", torch.tensor([1.0, 1.0]), [0.0, 2.0]).tolist() == [1.0, 2.0]
    assert normalization_scales("loss+", torch.tensor([0.0, 3.0]), [5.0, 2.0]).tolist() == [1.0, 6.0]
    with pytest.raises(ConfigError, match="< 0"):
        solve(gram_of([1.0, 0.0], [0.0, 1.0]), [-0.5, 1.0], normalization="loss")
    with pytest.raises(SolverError, match="finite"):
        solve(gram_of([1.0, 0.0], [0.0, 1.0]), [math.nan, 1.0], normalization="loss+")
    with pytest.raises(ConfigError, match="losses"):
        solve(gram_of([1.0, 0.0], [0.0, 1.0]), normalization="loss")
    with pytest.raises(SolverError, match="2 tasks"):
        solve(gram_of([1.0, 0.0], [0.0, 1.0]), [1.0, 2.0, 3.0], normalization="loss")


def test_unknown_normalization_names_the_valid_modes():
    with pytest.raises(ConfigError) as e:
        solve(gram_of([1.0, 0.0], [0.0, 1.0]), normalization="L2")
    for mode in NORMALIZATIONS:
        assert repr(mode) in str(e.value)
    with pytest.raises(ConfigError):
        normalization_scales("unit", torch.ones(2))
