"""The minimum-norm point of the convex hull of the task gradients: the solver behind MGDA.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
Given task gradients g_1 .. g_T on the shared parameters, MGDA's update direction is
``sum_t alpha_t g_t`` with

    alpha = argmin over the simplex (alpha >= 0, sum alpha = 1) of ||sum_t alpha_t g_t||^2
          = argmin alpha^T G alpha,   G_ij = <g_i, g_j>  (the T x T Gram matrix).

A minimum of 0 means the parameters are Pareto-stationary. Everything here works on
G alone, so the cost does not depend on the number of parameters.

How it is solved
- T = 1: ``[1]``. A zero gradient (a zero diagonal entry): weight 1 on it, since
  the hull then contains the origin (norm 0), which no other point beats.
- T = 2: the closed form of the paper's Algorithm 1,
  ``alpha_1 = clamp((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``; when
  ``G11 + G22 - 2 G12 = ||g1 - g2||^2`` is 0 to rounding, the norm is (nearly) linear
  along the segment and the end with the smaller norm is taken (``[0.5, 0.5]`` for
  identical gradients, where every point is optimal).
- T > 2: an exact solve instead of the paper's Frank-Wolfe loop (Algorithm 2), which
  converges like O(1/k): with its 250-iteration cap it stops far from the minimum at
  T = 40 (``benchmarks/bench_min_norm.py`` measures how far). The simplex QP is turned
  into a non-negative least-squares problem (the construction Lawson & Hanson use for
  least-distance programming, "Solving Least Squares Problems", 1974, ch. 23): with
  ``A = [g_1 .. g_T; 1 .. 1]``,

      c* = argmin_{c >= 0} ||A c - (0, .., 0, 1)||^2 = argmin_{c >= 0} 1/2 c^T H c - 1^T c,
      H = G / s + 1 1^T,

  and ``alpha = c* / sum(c*)`` (for fixed ``alpha = c / sum c`` the optimal
  ``sum c`` is ``1 / (1 + f)``, leaving ``f / (1 + f)``, increasing in
  ``f = alpha^T G alpha / s``; ``s > 0`` only scales the problem). That problem has
  only the bounds ``c >= 0``, and it is solved by block principal pivoting (Judice &
  Pires 1994; Kim & Park, SIAM J. Sci. Comput. 2011): guess the free set, solve
  ``H_FF c_F = 1`` by Cholesky, move every variable that breaks the optimality
  conditions to the other set, repeat, with the Judice-Pires backup rule (one variable
  at a time) against cycling. The first guess is the smallest gradient plus every
  gradient that is a descent direction from it; 1 to 5 Cholesky solves at T = 40 in
  our measurements, each capped by ``max_iter``. A variable moves only when it changes
  the objective by more than the tolerance allows, so the stopping rule is ``tol``.
- Every result is checked with the Frank-Wolfe duality gap
  ``2 (alpha^T G alpha - min_i (G alpha)_i) >= f(alpha) - f*``, which bounds the
  objective error without knowing the minimum. It must be ``<= tol * f(alpha)`` plus a
  rounding floor. Otherwise (affinely dependent gradients make ``H`` singular, e.g.
  identical gradients or T > dim + 1), the pivoting is retried on
  ``H + 1e-13 diag(H)``, and failing that the paper's Frank-Wolfe (Algorithm 2, exact
  line search) polishes the best point found, with ``max_iter`` iterations. The
  lowest-objective point found is returned: never NaN, always on the simplex. A point
  with ``alpha^T G alpha`` clearly below 0 (beyond the input's precision) proves G is
  not positive semidefinite: ``SolverError``.

Why on the CPU in float64: G is tiny, the pivoting branches on its values at every
step (a device sync per step on a GPU), so one copy to the host is the cheap way; and
``alpha^T G alpha`` of nearly cancelling gradients is a small difference of large
sums, which float32 (let alone bf16) cannot resolve. The small BLAS/LAPACK calls run
on one thread (``_one_thread``): more threads only wait for each other.

Gradient normalisation (``solve(..., normalization=...)``): as in Sener & Koltun's
code, each g_t can be divided by ``||g_t||`` (``l2``), its loss (``loss``), or both
(``loss+``) before solving: ``G'_ij = G_ij / (s_i s_j)``. The weights are used on
the raw gradients (the normalisation exists inside the solver only).
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import math

import torch
from torch.nn import functional as nnf

from ..errors import ConfigError, SolverError

log = logging.getLogger(__name__)

#: gradient normalisation modes of ``solve``/``normalization_scales``
NORMALIZATIONS = ("none", "l2", "loss", "loss+")

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
#: relative ridge added to H on the retry, when H is singular (affinely dependent gradients)
_RIDGE = 1e-13
#: sign tolerance on c in the pivoting (c is O(1/T): sum(c) = 1 / (1 + f / s) >= 1/2)
_C_TOL = 1e-13
#: border of the bordered Cholesky factorisation in the pivoting (any 0 < b < 1 keeps it well conditioned)
_BORDER = 0.5
#: Judice & Pires' number of full exchanges allowed without fewer infeasible variables
_BACKUP_TRIES = 3


def min_norm_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-10) -> torch.Tensor:
    """Weights ``alpha`` on the simplex minimising ``alpha^T G alpha`` (see the module docstring).

    ``gram``: the T x T Gram matrix ``G_ij = <g_i, g_j>`` (any float dtype, any device);
    must be finite, symmetric up to rounding and positive semidefinite.
    ``max_iter``: cap on pivoting steps (a few are typical) and on Frank-Wolfe
    iterations if the fallback runs. ``tol``: accepted relative objective error,
    certified by the duality gap (``f(alpha) - f* <= tol * f(alpha)`` + rounding).
    Returns ``alpha`` (shape ``(T,)``) on ``gram``'s device, in its dtype if float32
    or float64, float32 otherwise. Raises ``SolverError`` on unusable input.
    """
    _check_options(max_iter, tol)
    G, d, rtol, out_dtype = _prepare(gram)
    return _finish(_solve64(G, d, rtol, max_iter, tol), out_dtype, gram.device)


def normalization_scales(mode: str, norms, losses=None) -> torch.Tensor:
    """Per-task divisors ``s_t`` of Sener & Koltun's gradient normalisation.

    ``mode``: ``none`` (1), ``l2`` (``||g_t||``), ``loss`` (``L_t``), ``loss+``
    (``L_t * ||g_t||``). ``norms``: the gradient norms ``||g_t||`` (the square root of
    the Gram diagonal). ``losses``: the task losses, for ``loss``/``loss+``.

    Defined edge cases: a scale that is 0 (a zero gradient in ``l2``/``loss+``, a loss
    of exactly 0) is replaced by 1; a zero vector stays zero whatever its scale, and a
    task with zero loss keeps its raw gradient. A negative loss cannot be a scale
    (it would flip the gradient) and raises ``ConfigError``; non-finite or negative
    norms and non-finite losses raise ``SolverError``.
    Returns a float64 CPU tensor of shape ``(T,)``.
    """
    _check_mode(mode)
    n = _as_vector(norms, "norms")
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
        raise SolverError(f"gradient norms must be finite and >= 0; got {n.tolist()}.")
    if mode == "none":
        return torch.ones_like(n)
    if mode == "l2":
        s = n
    else:
        if losses is None:
            raise ConfigError(f"normalization '{mode}' divides each task's gradient by its loss: pass losses=[...] "
                              "(one per task), or use normalization 'l2' or 'none'.")
        L = _as_vector(losses, "losses")
        if L.numel() != n.numel():
            raise SolverError(f"got {L.numel()} losses for {n.numel()} tasks; pass one loss per task, in the "
                              "order of the Gram matrix.")
        if not bool(torch.isfinite(L).all()):
            raise SolverError(f"task losses must be finite for normalization '{mode}'; got {L.tolist()}.")
        if bool((L < 0).any()):
            i = int(torch.argmin(L))
            raise ConfigError(f"normalization '{mode}' divides gradients by the task losses, but task {i}'s loss is "
                              f"{L[i].item():.6g} < 0 (a negative loss, e.g. a Gaussian log-likelihood, cannot scale a "
                              "gradient). Use normalization 'l2' or 'none'.")
        s = L if mode == "loss" else L * n
    # A zero scale cannot divide: keep that task's vector as it is (see the docstring).
    s = torch.where(s > 0, s, torch.ones_like(s))
    if not bool(torch.isfinite(s).all()):
        raise SolverError(f"normalization '{mode}' gave non-finite scales {s.tolist()} (overflow).")
    return s


def solve(gram: torch.Tensor, losses=None, normalization: str = "none", max_iter: int = 250,
          tol: float = 1e-10) -> torch.Tensor:
    """MGDA's weights: ``min_norm_weights`` of the normalised Gram ``G_ij / (s_i s_j)``.

    ``s = normalization_scales(normalization, sqrt(diag G), losses)``. The returned
    weights multiply the raw task losses/gradients, as in Sener & Koltun's code: the
    normalisation only shapes the solver's problem. Same dtype/device rules and
    errors as ``min_norm_weights``; an unknown mode raises ``ConfigError``.
    """
    _check_mode(normalization)
    _check_options(max_iter, tol)
    G, d, rtol, out_dtype = _prepare(gram)
    if normalization != "none":
        s = normalization_scales(normalization, torch.tensor(d, dtype=_F64).clamp_min(0).sqrt(), losses)
        G = G / torch.outer(s, s)
        d = [x / si**2 for x, si in zip(d, s.tolist())]
        if not (all(map(math.isfinite, d)) and bool(torch.isfinite(G).all())):
            raise SolverError(f"normalization '{normalization}' with scales {s.tolist()} overflows the Gram matrix.")
    return _finish(_solve64(G, d, rtol, max_iter, tol), out_dtype, gram.device)


# --- input checks ---------------------------------------------------------------------------------


def _check_mode(mode) -> None:
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"unknown gradient normalization {mode!r}; choose one of: "
                          f"{', '.join(repr(m) for m in NORMALIZATIONS)}.")


def _check_options(max_iter, tol) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1; got {max_iter!r}.")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"tol must be a finite number >= 0; got {tol!r}.")


def _as_vector(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        v = x.detach()
    else:
        try:
            v = torch.tensor([float(e) for e in x])
        except (TypeError, ValueError) as e:
            raise SolverError(f"{name} must be a sequence of numbers or a tensor; got {x!r} ({e}).") from None
    if v.is_complex():
        raise SolverError(f"{name} must be real; got a {v.dtype} tensor.")
    return v.to(device="cpu", dtype=_F64).reshape(-1)


def _prepare(gram) -> tuple[torch.Tensor, list[float], float, torch.dtype]:
    """Validated, symmetrised float64 CPU copy of ``gram``, its diagonal, the relative precision of its
    entries (``rtol``) and the dtype to answer in."""
    if not isinstance(gram, torch.Tensor):
        raise SolverError(f"the Gram matrix must be a torch.Tensor; got {type(gram).__name__}.")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise SolverError(f"the Gram matrix must be square and non-empty (T x T); got shape {tuple(gram.shape)}. "
                          "Build it as M @ M.T from the (T, P) matrix of flattened task gradients.")
    if gram.is_complex():
        raise SolverError(f"the Gram matrix must be real; got dtype {gram.dtype}.")
    out_dtype = gram.dtype if gram.dtype in (torch.float32, _F64) else torch.float32
    # Asymmetry allowed: the rounding of two dot products computed in different orders.
    rtol = max(1e-4, 16 * torch.finfo(gram.dtype).eps) if gram.dtype.is_floating_point else 1e-4
    G = gram.detach().to(device="cpu", dtype=_F64)
    T = G.shape[0]
    if T <= 2:  # T = 1 or 2, the common case in MTL: check the few numbers in Python
        v = G.tolist()
        finite = all(math.isfinite(x) for row in v for x in row)
        worst = abs(v[0][1] - v[1][0]) if T == 2 and finite else 0.0  # max |G - G^T|
    elif torch.equal(G, G.T):  # exactly symmetric (False with any NaN)
        # The sum is finite when every entry is (an overflowing sum only sends us to the exact check).
        finite, worst = math.isfinite(G.sum().item()) or bool(torch.isfinite(G).all()), 0.0
    else:
        # max |G - G^T| is NaN or inf exactly when G has a NaN or an inf (inf - inf = NaN on the diagonal and
        # at a symmetric pair; a lone inf gives inf): one reduction checks finiteness and symmetry.
        worst = (G - G.T).abs_().max().item()
        finite = math.isfinite(worst)
    if not finite:
        bad = (~torch.isfinite(G)).nonzero().tolist()
        raise SolverError(f"the Gram matrix has {len(bad)} non-finite entries (NaN/inf), e.g. at (row, column) "
                          f"{[tuple(b) for b in bad[:4]]}: a task's gradient is NaN or overflowed. Check the losses "
                          "for NaN, or lower the learning rate.")
    d = [v[i][i] for i in range(T)] if T <= 2 else G.diagonal().tolist()
    dmin, dmax = min(d), max(d)
    if dmin < -rtol * max(dmax, 0.0) or dmax < 0:
        i = d.index(dmin)
        raise SolverError(f"the Gram matrix has a negative diagonal entry G[{i},{i}] = {dmin:.6g}; a Gram matrix "
                          "holds squared norms there (it must be positive semidefinite).")
    if worst == 0.0:
        return G, d, rtol, out_dtype
    # Symmetry, entry by entry: |G_ij - G_ji| <= rtol ||g_i|| ||g_j||. That bound is >= rtol * min_i |G_ii|,
    # so the maximum settles the common case.
    if worst > rtol * min(map(abs, d)):
        root = G.diagonal().abs().sqrt()
        excess = (G - G.T).abs_() - rtol * torch.outer(root, root)
        if excess.max().item() > 0:
            i, j = divmod(int(torch.argmax(excess)), T)
            raise SolverError(f"the Gram matrix is not symmetric: G[{i},{j}] = {G[i, j].item():.6g} but "
                              f"G[{j},{i}] = {G[j, i].item():.6g} (relative tolerance {rtol:g}). Pass M @ M.T.")
    return (G + G.T).mul_(0.5), d, rtol, out_dtype


def _finish(a: list[float], out_dtype: torch.dtype, device) -> torch.Tensor:
    if not all(math.isfinite(x) and x >= 0 for x in a):  # unreachable by construction; never hand out NaN
        raise SolverError(f"the min-norm solver produced invalid weights {a}; please report this with the Gram matrix.")
    return torch.tensor(a, dtype=out_dtype, device=device)


# --- the solver --------------------------------------------------------------------------------------
# Internally weights are Python lists: T is small, and every torch call costs microseconds of overhead,
# which is what the solve time is made of.


@contextlib.contextmanager
def _one_thread():
    """Run torch's BLAS/LAPACK calls single-threaded for the duration of a solve.

    The matrices are at most (T+1) x (2T+2): threads only add synchronisation, and on a
    machine whose cores are busy (data-loader workers, other jobs) an OpenMP/MKL
    barrier waits for a time slice: we measured a 4 x 4 Cholesky at 12 ms with 2
    threads on a loaded 2-core machine, against 6 us single-threaded. The setting is
    process-wide, so it is restored right after.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=64)
def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=_F64)  # read-only use: torch.cat copies it


def _vertex(T: int, i: int) -> list[float]:
    a = [0.0] * T
    a[i] = 1.0
    return a


def _segment_min(uu: float, uv: float, vv: float) -> float:
    """Weight ``gamma`` on v minimising ``||(1 - gamma) u + gamma v||^2`` over [0, 1].

    Sener & Koltun's Algorithm 1 (two vectors), from ``<u,u>``, ``<u,v>``, ``<v,v>``;
    also the exact line search of their Frank-Wolfe (Algorithm 2).
    """
    den = uu + vv - 2.0 * uv  # ||u - v||^2
    if den <= 4.0 * _EPS * (uu + vv):
        # u == v up to rounding: the norm is (nearly) linear along the segment; take the smaller end.
        return 1.0 if vv < uu else 0.0 if uu < vv else 0.5
    return min(1.0, max(0.0, (uu - uv) / den))


def _solve64(G: torch.Tensor, d: list[float], rtol: float, max_iter: int, tol: float) -> list[float]:
    T = G.shape[0]
    if T == 1:
        return [1.0]
    i0 = min(range(T), key=d.__getitem__)
    if d[i0] <= 0:  # a zero gradient: the origin is in the hull
        return _vertex(T, i0)
    if T == 2:
        g11, g12, g22 = d[0], G[0, 1].item(), d[1]
        if g12 * g12 > g11 * g22 * (1.0 + 1e-6):  # 2 x 2 PSD <=> diagonal >= 0 and Cauchy-Schwarz
            raise SolverError(f"the Gram matrix {G.tolist()} is not positive semidefinite: "
                              "|G12| > sqrt(G11 G22) breaks Cauchy-Schwarz.")
        w1 = _segment_min(g22, g12, g11)
        return [w1, 1.0 - w1]
    with _one_thread():
        return _solve_general(G, d, i0, rtol, max_iter, tol)


def _solve_general(G: torch.Tensor, d: list[float], i0: int, rtol: float, max_iter: int, tol: float) -> list[float]:
    T = G.shape[0]
    norms = [math.sqrt(x) for x in d]
    best, best_f = _vertex(T, i0), d[i0]
    # s = the smallest squared norm: f* <= s, so f / s <= 1 and sum(c) = 1 / (1 + f / s) lies in [1/2, 1).
    s = max(d[i0], max(d) * 1e-200)
    # First guess of the free set: the smallest gradient g_i0 and every g_j that makes a descent direction
    # from it (<g_i0, g_j> < ||g_i0||^2). Exact when the answer is a vertex or an edge from it, and close
    # otherwise: fewer pivoting steps than starting from all tasks, never more in our measurements.
    row = G[i0].tolist()
    free0 = [j == i0 or row[j] < d[i0] for j in range(T)]
    for ridge in (0.0, _RIDGE):
        c = _block_pivoting(G, s, ridge, max_iter, tol, free0)
        if c is None:
            continue
        total = sum(c)
        a = [x / total for x in c]
        f, ok = _certify(G, norms, a, tol, rtol)
        if ok:
            return a
        if f < best_f:
            best, best_f = a, f
    log.debug("min-norm: pivoting gave no certified solution (T=%d); Frank-Wolfe polishes the best point", T)
    a = _frank_wolfe(G, best, max_iter, tol)
    f, _ = _certify(G, norms, a, tol, rtol)
    return a if f <= best_f else best


def _block_pivoting(G: torch.Tensor, s: float, ridge: float, max_iter: int, tol: float,
                    free: list[bool]) -> list[float] | None:
    """``c >= 0`` with ``y = H c - 1 >= 0`` and ``c^T y = 0`` for ``H = G / s + 1 1^T (+ ridge diag)``, or None.

    Block principal pivoting (Judice & Pires 1994; Kim & Park 2011): from a guess
    ``free`` of the free set F (c_B = 0), solve ``H_FF c_F = 1``, flip every variable with
    ``c_i < 0`` (i in F) or ``y_j < 0`` (j not in F), repeat. None when a Cholesky
    factorisation fails (H_FF singular) or ``max_iter`` steps do not settle.

    One Cholesky and one triangular solve per step give everything. With the
    bordered matrix ``X = [[H_FF, b 1], [b 1^T, b]] = L L^T``, ``b = 1/2`` (positive
    definite: its Schur complement is ``b (1 - b q / (1 + q)) >= b / 2``, as
    ``1^T H_FF^-1 1 = q / (1 + q)`` by Sherman-Morrison, ``q = 1^T (G_FF / s)^-1 1``)
    and ``rho = L[-1, -1]``, the block inverse of X gives
    ``c_F = -rho (L^-1)[-1, :-1] / b`` and, for ``u_j = (H_jF, b)``,
    ``y_j = -rho (L^-1 u_j)[-1] / b``: all from the last row of ``L^-1 [u_0 .. u_T, I]``.
    """
    T = G.shape[0]
    # Stored transposed (H is symmetric), so that selected rows are a contiguous right-hand side.
    # Columns 0..T-1: [H; b 1^T]; column T: [b 1; b] (the border); columns T+1..2T+1: the identity. Selecting
    # the rows F + border gives u_j^T (columns 0..T), X (columns F + border), I[F + border, :] (columns T+1..).
    b = _BORDER
    ext = torch.cat((nnf.pad(G, (0, 1, 0, 1), value=(b - 1.0) * s).div_(s).add_(1.0), _eye(T + 1)), dim=1)
    if ridge:
        ext.diagonal()[:T].mul_(1.0 + ridge)
    free = list(free)
    fewest, tries = T + 1, _BACKUP_TRIES
    for _ in range(max_iter):
        idx = [i for i in range(T) if free[i]]
        k = len(idx)
        if k == 0:
            return None
        buf = array.array("q", idx + [T])
        sel = torch.frombuffer(buf, dtype=torch.int64)  # the fastest list -> index tensor
        rows = ext.index_select(0, sel)
        L, info = torch.linalg.cholesky_ex(rows.index_select(1, sel))
        if info.item() != 0:
            return None
        z = torch.linalg.solve_triangular(L, rows, upper=False)[k].tolist()
        r = -1.0 / (z[2 * T + 1] * b)  # -rho / b
        c = [0.0] * T
        bad = []
        for i in idx:
            c[i] = ci = r * z[T + 1 + i]
            if ci < -_C_TOL:
                bad.append(i)
        # On a bound task j, y_j = sum(c) ((G alpha)_j - f) / s: y_j < -theta means weight on task j lowers the
        # objective by more than the accepted duality gap; theta = tol/4 * sum(c) f / s = tol/4 (1 - sum(c)).
        theta = (1.0 - sum(c)) * (tol / 4) + 16 * _EPS
        bad += [j for j in range(T) if not free[j] and r * z[j] < -theta]
        n = len(bad)
        if n == 0:
            return [max(x, 0.0) for x in c]
        if n < fewest:
            fewest, tries = n, _BACKUP_TRIES
        elif tries > 0:
            tries -= 1
        else:  # backup rule: exchange only the infeasible variable with the largest index
            bad = [max(bad)]
        for j in bad:
            free[j] = not free[j]
    return None


def _certify(G: torch.Tensor, norms: list[float], a: list[float], tol: float, rtol: float) -> tuple[float, bool]:
    """Objective ``f = a^T G a`` and whether the Frank-Wolfe duality gap certifies ``a``.

    ``rtol``: the relative precision of G's entries; ``f`` below ``-rtol m^2`` proves G is
    not positive semidefinite (m as below), while ``f <= 0`` within it is a zero norm to
    the input's precision: optimal.
    """
    T = len(a)
    v = torch.mv(G, torch.tensor(a, dtype=_F64)).tolist()
    f = math.fsum(x * y for x, y in zip(a, v))
    i = min(range(T), key=v.__getitem__)
    # Rounding floor of f and (G a)_i: T eps times the sums of |products|, which Cauchy-Schwarz bounds by
    # m^2 and ||g_i|| m, m = sum_j a_j ||g_j||.
    m = math.fsum(x * y for x, y in zip(a, norms))
    floor = 4 * T * _EPS * m * (m + norms[i])
    if f < -rtol * m * m:
        raise SolverError(f"the Gram matrix is not positive semidefinite: found weights with a^T G a = {f:.6g} < 0.")
    return f, f <= floor or 2.0 * (f - v[i]) <= tol * f + floor


def _frank_wolfe(G: torch.Tensor, a: list[float], max_iter: int, tol: float) -> list[float]:
    """Sener & Koltun's Algorithm 2: Frank-Wolfe on the simplex with exact line search.

    Each step moves towards the vertex ``e_t`` with the smallest ``(G a)_t`` (the
    linear minimiser), by the exact minimiser along the segment (``_segment_min``).
    Stops when the duality gap ``2 (f - min_t (G a)_t)`` is ``<= tol * f`` (plus
    rounding), when the step is 0, or after ``max_iter`` steps.
    """
    T = G.shape[0]
    x = torch.tensor(a, dtype=_F64)
    v = torch.mv(G, x)
    f = torch.dot(x, v).item()
    for _ in range(max_iter):
        t = int(torch.argmin(v))
        vt, gtt = v[t].item(), G[t, t].item()
        if 2.0 * (f - vt) <= tol * f + 8 * T * _EPS * (abs(f) + abs(vt)):
            break
        gamma = _segment_min(f, vt, gtt)  # u = the current point, v = g_t
        if gamma <= 0.0:
            break
        x.mul_(1.0 - gamma)
        x[t] += gamma
        v.mul_(1.0 - gamma).add_(G[:, t], alpha=gamma)
        f = (1.0 - gamma) ** 2 * f + 2.0 * gamma * (1.0 - gamma) * vt + gamma**2 * gtt
    x.clamp_(min=0.0)
    return (x / x.sum()).tolist()
