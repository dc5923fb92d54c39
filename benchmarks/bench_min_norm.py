"""How exact and how fast is MGDA's min-norm solver (``mtl.weighting.min_norm``)?

For T tasks, the solver finds alpha on the simplex minimising alpha^T G alpha, where G is
the T x T Gram matrix of the task gradients (Sener & Koltun, NeurIPS 2018). This script
builds G from random, correlated task gradients, for T in --tasks and --seeds problems
per T, and measures three things on each:

- accuracy against an exact QP: scipy's SLSQP (ftol 1e-16), then an active-set polish on
  its support (exact face solutions, dropping/adding tasks until the KKT conditions hold).
  Every reference point must pass a Frank-Wolfe duality-gap certificate (gap <= 1e-10 f
  + rounding); the run stops if one does not. Reported: the max L1 distance of the
  weights and the max relative objective gap (f - f_ref) / f_ref over the seeds;
  targets 1e-4 and 1e-7;
- the solve time per call of ``min_norm_weights`` on the CPU (float64 T x T tensor in,
  weights out: validation, solve, certificate, output tensor), the median over
  --calls calls per problem;
- the same for a straightforward NumPy Frank-Wolfe written here: the plain Algorithm 2
  of the paper (alpha = 1/T; t = argmin_r (G alpha)_r; exact line search between the
  current point and g_t, the two-vector closed form; stop when ||delta alpha||_1 <
  --ref-stop, 1e-5 as in the authors' code, or after --max-iter iterations, 250), and
  the accuracy it reaches. The time ratio (ours / NumPy) is measured in the same run,
  the two sides interleaved in blocks so that both see the same machine load.

Problems: gradients g_t = (rho * s + n_t) * exp(sd * z_t) in D dimensions, with s, n_t,
z_t standard normal: a shared component s (correlated tasks) and unequal norms. The seed
picks the regime (rho, sd) in turn from {(1, 0.5), (3, 0), (0.3, 1), (1, 0), (10, 0)} and
D = max(4 T, 64) (more dimensions than tasks, so the optimum is unique and weights can be
compared).

Results go to benchmarks/results/min_norm.json and .md (atomic writes). The exit status
is 0 whether or not the targets are met.

  python benchmarks/bench_min_norm.py
  python benchmarks/bench_min_norm.py --tasks 2,3,5,10,40,100 --seeds 8 --calls 500
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from common import load_average, machine_info as common_machine_info  # noqa: E402
from mtl.io import atomic_write, ensure_writable_dir, write_json  # noqa: E402
from mtl.weighting.min_norm import min_norm_weights  # noqa: E402

TARGET_L1 = 1e-4
TARGET_REL_GAP = 1e-7
TARGET_TIME_US = 1000.0  # at T = TIME_TARGET_T
TIME_TARGET_T = 40
REGIMES = [(1.0, 0.5), (3.0, 0.0), (0.3, 1.0), (1.0, 0.0), (10.0, 0.0)]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets: max L1 weight error <= 1e-4 and relative objective gap <= 1e-7 "
                                       "against the exact QP; median solve time <= 1 ms at T = 40.")
    p.add_argument("--tasks", default="2,3,5,10,40", help="comma-separated numbers of tasks T (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="random problems per T (default: %(default)s)")
    p.add_argument("--calls", type=int, default=200,
                   help="timed calls per problem and side, in blocks of 10 alternating sides (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=250,
                   help="iteration cap of both solvers (default: %(default)s, the paper's)")
    p.add_argument("--ref-stop", type=float, default=1e-5,
                   help="the NumPy Frank-Wolfe stops when ||delta alpha||_1 falls below this (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the process (default: leave torch's setting; the solver "
                        "runs its small matrix calls on one thread either way)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where to write min_norm.json/.md")
    args = p.parse_args(argv)
    try:
        args.task_list = [int(t) for t in args.tasks.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tasks must be comma-separated integers; got {args.tasks!r}")
    if not args.task_list or min(args.task_list) < 1:
        p.error("--tasks needs at least one T >= 1")
    for name in ("seeds", "calls", "max_iter"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.ref_stop >= 0:
        p.error("--ref-stop must be >= 0")
    return args


# --- problems and the exact reference --------------------------------------------------------------------------


def make_gram(T: int, seed: int) -> tuple[np.ndarray, dict]:
    rho, sd = REGIMES[seed % len(REGIMES)]
    D = max(4 * T, 64)
    rng = np.random.default_rng(1000 * T + seed)
    M = (rho * rng.standard_normal(D) + rng.standard_normal((T, D))) * np.exp(sd * rng.standard_normal((T, 1)))
    return M @ M.T, {"rho": rho, "sd": sd, "dim": D}


def fw_gap(G: np.ndarray, a: np.ndarray) -> float:
    """Frank-Wolfe duality gap, an upper bound on f(a) - min f."""
    v = G @ a
    return 2.0 * float(a @ v - v.min())


def face_solution(G: np.ndarray, S: list[int]) -> tuple[np.ndarray, float]:
    """Minimiser on the affine hull of face S: [[G_SS, 1], [1^T, 0]] [a; -lam] = [0; 1]."""
    r = len(S)
    K = np.zeros((r + 1, r + 1))
    K[:r, :r] = G[np.ix_(S, S)]
    K[:r, r] = K[r, :r] = 1.0
    rhs = np.zeros(r + 1)
    rhs[r] = 1.0
    sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    return sol[:r], -sol[r]


def exact_qp(G: np.ndarray) -> tuple[np.ndarray, float]:
    """SLSQP, polished on its support by an active-set pass; returns (alpha, certified duality gap)."""
    T = len(G)
    if T == 1:
        return np.ones(1), 0.0
    res = minimize(lambda a: a @ G @ a, np.full(T, 1.0 / T), jac=lambda a: 2 * G @ a, method="SLSQP",
                   bounds=[(0.0, 1.0)] * T, options={"ftol": 1e-16, "maxiter": 5000},
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(T)}])
    a = np.clip(res.x, 0, None)
    S = sorted(np.flatnonzero(a > 1e-7 * a.max()).tolist())
    for _ in range(4 * T):
        aS, lam = face_solution(G, S)
        if aS.min() < 0:
            S.pop(int(np.argmin(aS)))
            continue
        a = np.zeros(T)
        a[S] = aS
        out = [j for j in range(T) if j not in S]
        mu = G @ a - lam
        if out and mu[out].min() < -1e-13 * abs(lam):
            S = sorted(S + [out[int(np.argmin(mu[out]))]])
            continue
        break
    a = a / a.sum()
    f, gap = float(a @ G @ a), fw_gap(G, a)
    norms = np.sqrt(np.diag(G))
    floor = 1e-13 * float(norms @ a) * float(norms @ a + norms.max())
    if not (a.min() >= 0 and gap <= 1e-10 * f + floor):
        raise RuntimeError(f"the reference QP solution failed its KKT certificate (gap {gap:.3g}, f {f:.3g}); "
                           "the accuracy figures would be meaningless")
    return a, gap


# --- the NumPy reference: Sener & Koltun's Algorithm 2 -------------------------------------------------------


def numpy_frank_wolfe(G: np.ndarray, max_iter: int, stop: float) -> tuple[np.ndarray, int]:
    """Plain Frank-Wolfe with exact line search (Algorithm 2 of the paper), from alpha = 1/T."""
    T = len(G)
    alpha = np.full(T, 1.0 / T)
    it = 0
    for it in range(1, max_iter + 1):
        Ga = G @ alpha
        t = int(np.argmin(Ga))
        # Exact line search between u = sum alpha g (|u|^2 = alpha.Ga) and v = g_t: gamma weights v.
        uu, uv, vv = float(alpha @ Ga), float(Ga[t]), float(G[t, t])
        den = uu + vv - 2.0 * uv
        gamma = 0.0 if den <= 0 else min(1.0, max(0.0, (uu - uv) / den))
        new = (1.0 - gamma) * alpha
        new[t] += gamma
        change = float(np.abs(new - alpha).sum())
        alpha = new
        if change < stop:
            break
    return alpha, it


# --- timing ------------------------------------------------------------------------------------------------


def time_calls(fns: dict, calls: int, block: int = 10) -> dict[str, list[float]]:
    """Per-call wall times (s) of each function, interleaved in blocks so both see the same load."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name, fn in fns.items():
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        done += n
    return times


def machine_info(threads: int) -> dict:
    return common_machine_info(numpy=np.__version__, scipy=scipy.__version__, torch_threads=threads)


def us(seconds: float) -> float:
    return round(seconds * 1e6, 2)


def fmt(x: float) -> str:
    return f"{x:.2e}"


def write_markdown(path: Path, result: dict) -> None:
    m, cfg = result["machine"], result["config"]
    rows = [
        "# Min-norm solver (MGDA): accuracy against an exact QP, time per call",
        "",
        f"{cfg['seeds']} random problems per T (correlated task gradients, unequal norms, D = max(4T, 64)); "
        f"{cfg['calls']} timed calls per problem and side, float64 T x T input, CPU. Reference: NumPy Frank-Wolfe "
        f"(Algorithm 2 of Sener & Koltun, exact line search, cap {cfg['max_iter']}, stop at ||delta alpha||_1 < "
        f"{cfg['ref_stop']:g}). {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"numpy {m['numpy']}, torch threads {m['torch_threads']}; load average start {result['load_average']['start']}"
        f", end {result['load_average']['end']}.",
        "",
        "| T | ours: max L1 | ours: max rel. gap | ours: median us | NumPy FW: max L1 | NumPy FW: max rel. gap "
        "| NumPy FW: median us (iters) | time ratio ours / NumPy | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["per_T"]:
        o, f = r["ours"], r["numpy_fw"]
        rows.append(f"| {r['T']} | {fmt(o['max_l1'])} | {fmt(o['max_rel_gap'])} | {o['median_us']:.0f} | "
                    f"{fmt(f['max_l1'])} | {fmt(f['max_rel_gap'])} | {f['median_us']:.0f} ({f['median_iters']:.0f}) | "
                    f"{r['time_ratio']:.2f} | {r['verdict']} |")
    rows += [
        "",
        f"Targets: max L1 <= {TARGET_L1:g}, relative objective gap (f - f_exact) / f_exact <= {TARGET_REL_GAP:g} "
        f"(a negative gap: ours lies below the reference by rounding); median time <= {TARGET_TIME_US:.0f} us at "
        f"T = {TIME_TARGET_T}. **Overall: {result['verdict']}.**",
        "",
        "The exact reference is scipy SLSQP polished by an active-set pass and certified by its Frank-Wolfe "
        f"duality gap (largest certified gap / f: {fmt(result['reference_max_rel_certificate'])}).",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = ensure_writable_dir(args.out_dir)
    load_start = load_average()
    per_T, worst_cert = [], 0.0
    t_start = time.perf_counter()
    for T in args.task_list:
        errs, gaps, ref_errs, ref_gaps, ref_iters, ours_t, ref_t = [], [], [], [], [], [], []
        for seed in range(args.seeds):
            G, _ = make_gram(T, seed)
            exact, cert = exact_qp(G)
            f_exact = float(exact @ G @ exact)
            worst_cert = max(worst_cert, cert / f_exact)
            Gt = torch.from_numpy(G)
            a = min_norm_weights(Gt, max_iter=args.max_iter).numpy()
            b, iters = numpy_frank_wolfe(G, args.max_iter, args.ref_stop)
            errs.append(float(np.abs(a - exact).sum()))
            gaps.append((float(a @ G @ a) - f_exact) / f_exact)
            ref_errs.append(float(np.abs(b - exact).sum()))
            ref_gaps.append((float(b @ G @ b) - f_exact) / f_exact)
            ref_iters.append(iters)
            times = time_calls({"ours": lambda: min_norm_weights(Gt, max_iter=args.max_iter),
                                "numpy": lambda: numpy_frank_wolfe(G, args.max_iter, args.ref_stop)}, args.calls)
            ours_t += times["ours"]
            ref_t += times["numpy"]
        med_ours, med_ref = statistics.median(ours_t), statistics.median(ref_t)
        q_ours = statistics.quantiles(ours_t, n=10) if len(ours_t) > 1 else [med_ours] * 9
        accurate = max(errs) <= TARGET_L1 and max(gaps) <= TARGET_REL_GAP
        fast = T != TIME_TARGET_T or med_ours * 1e6 <= TARGET_TIME_US
        row = {
            "T": T,
            "ours": {"max_l1": max(errs), "max_rel_gap": max(gaps), "min_rel_gap": min(gaps),
                     "median_us": us(med_ours), "p10_us": us(q_ours[0]), "p90_us": us(q_ours[-1]),
                     "min_us": us(min(ours_t))},
            "numpy_fw": {"max_l1": max(ref_errs), "max_rel_gap": max(ref_gaps), "median_us": us(med_ref),
                         "median_iters": statistics.median(ref_iters), "max_iters": max(ref_iters),
                         "runs_at_cap": sum(i >= args.max_iter for i in ref_iters)},
            "time_ratio": round(med_ours / med_ref, 4),
            "accuracy_verdict": "PASS" if accurate else "ABOVE TARGET",
            "verdict": "PASS" if accurate and fast else "ABOVE TARGET",
        }
        if T == TIME_TARGET_T:
            row["time_verdict"] = "PASS" if fast else "ABOVE TARGET"
        per_T.append(row)
        o, f = row["ours"], row["numpy_fw"]
        print(f"T={T:>3}: ours L1 {fmt(o['max_l1'])}, rel gap {fmt(o['max_rel_gap'])}, median {o['median_us']:.0f} us "
              f"(p10 {o['p10_us']:.0f}, p90 {o['p90_us']:.0f}) | NumPy FW L1 {fmt(f['max_l1'])}, rel gap "
              f"{fmt(f['max_rel_gap'])}, median {f['median_us']:.0f} us, {f['median_iters']:.0f} iterations "
              f"({f['runs_at_cap']}/{args.seeds} at the cap) | ours / NumPy time {row['time_ratio']:.2f}", flush=True)
    load_end = load_average()
    verdict = "PASS" if all(r["verdict"] == "PASS" for r in per_T) else "ABOVE TARGET"
    command = shlex.join(["python", "benchmarks/bench_min_norm.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "benchmark": "min_norm",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"tasks": args.task_list, "seeds": args.seeds, "calls": args.calls, "max_iter": args.max_iter,
                   "ref_stop": args.ref_stop, "threads": args.threads, "regimes_rho_sd": REGIMES,
                   "dim": "max(4 T, 64)", "input": "float64 T x T CPU tensor (ours) / ndarray (NumPy)",
                   "targets": {"max_l1": TARGET_L1, "max_rel_gap": TARGET_REL_GAP,
                               "median_us_at_T": [TIME_TARGET_T, TARGET_TIME_US]}},
        "machine": machine_info(torch.get_num_threads()),
        "load_average": {"start": load_start, "end": load_end},
        "reference_max_rel_certificate": worst_cert,
        "per_T": per_T,
        "verdict": verdict,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(out / "min_norm.json", result)
    write_markdown(out / "min_norm.md", result)
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}; wall {result['wall_s']} s")
    print(f"results: {out / 'min_norm.json'}, {out / 'min_norm.md'}")
    for r in per_T:
        o = r["ours"]
        print(f"{r['accuracy_verdict']}: T={r['T']} accuracy: max L1 {fmt(o['max_l1'])} (target <= {TARGET_L1:g}), "
              f"max relative objective gap {fmt(o['max_rel_gap'])} (target <= {TARGET_REL_GAP:g})")
        if "time_verdict" in r:
            print(f"{r['time_verdict']}: T={r['T']} median solve time {o['median_us']:.0f} us "
                  f"(target <= {TARGET_TIME_US:.0f} us); ours / NumPy Frank-Wolfe = {r['time_ratio']:.2f}")
    print(f"{verdict}: overall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
