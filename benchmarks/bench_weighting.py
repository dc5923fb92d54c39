"""What does each loss-balancing method cost per training step, relative to equal weighting?

Times one training step of every weighting (``equal``, ``uncertainty``, ``gradnorm``,
``mgda``, ``mgda_ub``) on the CPU, in one process, in two settings:

- ``t2``: T = 2, MultiMNIST. MultiLeNet encoder (``build_encoder("multilenet")``) and two
  ``ClassificationHead(50, 10, hidden=50, dropout=0.5)`` heads ("left", "right"),
  ``classification_task`` each; batch 256 of MultiMNIST training pairs (the embedded
  MNIST digits; ``--t2-data random`` for random images and labels instead).
- ``t40``: T = 40, CelebA-shaped. ResNet-18 encoder (``build_encoder("resnet18")``, random
  weights, 512-d output) on 64x64 RGB inputs and 40 heads ``MultiLabelHead(512, 1)``,
  ``binary_task`` each; random normal images and random 0/1 labels, batch 16.

What one step is (``Trainer.train_step`` without the Accelerator; the weighting is not
bound, so its backward passes call ``loss.backward()`` directly): the model forward with
``return_rep=True``; each task's loss (``Task.loss``, with its target check); the losses
stacked and copied to Python floats with a finiteness check (as the Trainer does before
every step); ``weighting.backward(losses, shared_params=list(model.shared_parameters()),
rep=z)``; ``Adam.step`` (lr 1e-3, the Trainer's default; the weighting's own parameters
are optimised with the model's unless it has its own optimizer, as in the Trainer);
``zero_grad(set_to_none=True)``. Batches are built before timing (a few fixed batches,
cycled), so no data loading is timed. Every method trains its own copy of the model,
all copies starting from the same weights.

How it is measured (wall clock, ``time.perf_counter``), in one process with
``--threads`` torch threads (1 by default: when other jobs share the machine, several
OpenMP threads per process make step times swing by 2-10x; ``--threads 0`` keeps torch's
default): per setting, every method first runs warm-up steps (two; one for a "slow"
method, whose first step takes more than ``--slow-factor`` times equal weighting's first
step and more than ``--slow-step-s``). The warm-up time fixes how many consecutive steps
a method runs per round (enough for about ``--round-seconds``, at most ``--max-steps``,
at least 1). Then ``--rounds`` rounds: each round runs every method once, for its block
of steps, in an order rotated from round to round, so that every method sees the same
machine load. A slow method (exact MGDA at T = 40) takes part in the first
``--slow-rounds`` rounds only. The figure of a method in a round is its mean step time in
that round; its ratio is the median of those figures over the rounds divided by the
median of equal weighting's figures over the same rounds (per-round ratios, method /
equal in the same round, are reported too).

Also measured, at T = 40:

- the routes to the per-task quantities the gradient methods need, on one retained
  forward graph, called in rotated order ``--grad-rounds`` times each, no separate warm-up
  (the steps before ran the same shapes): exact MGDA's per-task gradients on the shared
  ResNet-18 parameters, ``per_task_gradients(L, params, batched=True)`` against
  ``batched=False`` (one backward per task), and optionally (``--torch-func-calls``)
  ``torch.func``'s vjp + vmap; GradNorm's per-task norms at the last shared weight by its
  layer route (``GradNormWeighting.gradient_norms``), by the batched call and by the loop.
  Every route's result is compared with the loop's (max absolute difference / max
  absolute value).
- which operations of the backward pass have no batching rule in the legacy vmap that
  ``torch.autograd.grad(..., is_grads_batched=True)`` uses (these run one task at a time
  inside the "batched" call), from the warnings that torch shows only when
  ``torch._C._debug_only_display_vmap_fallback_warnings(True)`` is set, on a 2-sample batch.
- peak memory of one step per method: each method in a fresh subprocess, which builds
  the T = 40 model, runs one equal-weighting step (Adam state, allocator warm-up), resets
  the kernel's peak-RSS mark (``/proc/self/clear_refs`` with ``5``), reads VmRSS, runs
  one step of the method and reads VmHWM: the peak RSS increase during that step. Where
  the mark cannot be reset, the increase of ``getrusage`` maxrss over the RSS before the
  first step is used instead (the JSON says which).
- with ``--profile`` (default on), torch.profiler's top operations (self CPU time) of
  one step of every method that is not slow.

Targets (verdicts PASS / ABOVE TARGET): MGDA-UB <= 1.10x equal at T = 2 and <= 1.25x at
T = 40; GradNorm <= 1.30x at both; batched per-task gradients >= 2x faster than the loop
at T = 40 (time batched / loop <= 0.50). Exact MGDA's ratios and the memory are reported
without a target. A run is flagged noisy when a method's per-round figures, or its
per-round ratios, vary by more than 1.5x (max / min). Only ratios measured in the same
run are meaningful on a noisy machine.

Results go to ``benchmarks/results/weighting.json`` and ``.md`` (atomic writes). The exit
status is 0 whether or not the targets are met.

  python benchmarks/bench_weighting.py
  python benchmarks/bench_weighting.py --rounds 9 --threads 0 --settings t40
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import (ensure_threads, load_average, parse_choices, proc_status_kib, reset_peak_rss,  # noqa: E402
                    save_results, verdict_at_most)
from common import machine_info as common_machine_info  # noqa: E402
from mtl.data import MultiMNIST  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.heads import ClassificationHead, MultiLabelHead  # noqa: E402
from mtl.io import atomic_write  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import binary_task, classification_task  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402
from mtl.weighting.gradients import per_task_gradients  # noqa: E402
from mtl.weighting.gradnorm import GradNormWeighting  # noqa: E402

METHODS = ("equal", "uncertainty", "gradnorm", "mgda", "mgda_ub")
SETTINGS = ("t2", "t40")
LR = 1e-3
NOISY_SPREAD = 1.5
BATCHES_PER_SETTING = 4  # fixed batches, cycled
T40_TASKS = 40
T40_SIZE = 64
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: (setting, method) -> the largest allowed ratio method / equal
STEP_TARGETS = {("t2", "mgda_ub"): 1.10, ("t40", "mgda_ub"): 1.25, ("t2", "gradnorm"): 1.30, ("t40", "gradnorm"): 1.30}
GRAD_TARGET = 0.50  # batched / loop time of exact MGDA's per-task gradients at T = 40 (>= 2x faster)
MEMORY_CHILD_FLAG = "--memory-child"
ROUTES_TEXT = (
    "Routes: `loop` = `per_task_gradients(batched=False)`, one `autograd.grad` per task; `batched` = "
    "`per_task_gradients(batched=True)`, one `autograd.grad(..., is_grads_batched=True)`; `layer` = "
    "`GradNormWeighting.gradient_norms`, the norms from the layer's input and the T gradients at its output "
    "(`mtl/weighting/layer_gradients.py`); `torch_func` = `torch.func.vjp` of a functional forward and "
    "`torch.func.vmap` of its pullback over the T unit cotangents (includes one forward pass). For GradNorm "
    "every route ends in the T norms."
)

TIMED_STEP = (
    "model forward (return_rep=True), Task.loss per task, losses stacked and copied to floats with a finiteness "
    "check, weighting.backward(losses, shared_params=list(model.shared_parameters()), rep=z) with the weighting "
    "unbound (no Accelerator), Adam.step (lr 1e-3), zero_grad(set_to_none=True); batches prebuilt, no data loading"
)


# ----- arguments ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one training step of each weighting relative to equal weighting (CPU, alternating "
                    "rounds in one run) at T = 2 (MultiMNIST, MultiLeNet) and T = 40 (ResNet-18, 64x64 RGB), "
                    "exact MGDA's batched per-task gradients against the per-task loop, and the peak memory of "
                    "one step per method.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated settings to run: t2 (MultiLeNet, 2 tasks), t40 (ResNet-18, 40 tasks)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated weightings to time (equal is always included); from {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=7, help="alternating timed rounds per setting")
    p.add_argument("--round-seconds", type=float, default=0.5,
                   help="aim for this much time per method per round (sets the steps per round from the warm-up)")
    p.add_argument("--max-steps", type=int, default=10, help="most consecutive steps of one method per round")
    p.add_argument("--slow-factor", type=float, default=10.0,
                   help="a method whose first warm-up step takes longer than this many equal-weighting first "
                        "steps (and longer than --slow-step-s) is 'slow': 1 warm-up step, 1 step per round, "
                        "and only --slow-rounds rounds")
    p.add_argument("--slow-step-s", type=float, default=1.0, help="a step shorter than this is never slow")
    p.add_argument("--slow-rounds", type=int, default=3, help="rounds that a slow method takes part in")
    p.add_argument("--grad-rounds", type=int, default=3,
                   help="timed calls of each of per_task_gradients(batched=True/False) at T = 40 (0: skip)")
    p.add_argument("--torch-func-calls", type=int, default=0,
                   help="timed calls of the torch.func route to exact MGDA's per-task gradients at T = 40 "
                        "(about 3 minutes each on one CPU thread; 0: skip)")
    p.add_argument("--t2-batch-size", type=int, default=256, help="batch size at T = 2")
    p.add_argument("--t2-data", choices=("multimnist", "random"), default="multimnist",
                   help="T = 2 inputs: MultiMNIST pairs from the embedded MNIST digits, or random images/labels")
    p.add_argument("--t40-batch-size", type=int, default=16, help="batch size at T = 40")
    p.add_argument("--memory-methods", default="equal,mgda,mgda_ub,gradnorm",
                   help="weightings whose T = 40 step peak RSS is measured, each in a fresh subprocess "
                        "('' or 'none': skip)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one T = 40 step of every method that is not slow (top operations by self CPU time)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for everything (0: leave torch's default; the count used is recorded). "
                        "1 by default: with other jobs on the machine, several OpenMP threads per process make "
                        "step times swing by 2-10x; use --threads 0 (or N) on a quiet machine")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the model initialisation")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder for weighting.json and weighting.md")
    p.add_argument(MEMORY_CHILD_FLAG, default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    for name in ("rounds", "max_steps", "slow_rounds", "t2_batch_size", "t40_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.torch_func_calls < 0:
        p.error(f"--torch-func-calls must be >= 0, got {args.torch_func_calls}")
    if args.grad_rounds < 0:
        p.error(f"--grad-rounds must be >= 0, got {args.grad_rounds}")
    if not (args.round_seconds > 0 and args.slow_step_s > 0 and args.slow_factor > 0):
        p.error("--round-seconds, --slow-factor and --slow-step-s must be > 0")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    args.settings = parse_choices(p, "--settings", args.settings, SETTINGS)
    methods = parse_choices(p, "--methods", args.methods, METHODS)
    args.methods = ["equal"] + [m for m in methods if m != "equal"]
    mem = args.memory_methods.strip()
    args.memory_methods = [] if mem in ("", "none") else parse_choices(p, "--memory-methods", mem, METHODS)
    if args.memory_child is not None and args.memory_child not in METHODS:
        p.error(f"unknown weighting {args.memory_child!r}")
    return args




# ----- the two settings ----------------------------------------------------------------------------


class Setting:
    """Model factory, tasks and prebuilt batches of one benchmark setting."""

    def __init__(self, key: str, args):
        self.key = key
        gen = torch.Generator().manual_seed(args.seed)
        if key == "t2":
            self.task_names = ["left", "right"]
            self.tasks = [classification_task(t, 10) for t in self.task_names]
            self.batch_size = args.t2_batch_size
            n = self.batch_size * BATCHES_PER_SETTING
            if args.t2_data == "multimnist":
                data = MultiMNIST("train", size=n, seed=args.seed)
                self.batches = list(DataLoader(data, batch_size=self.batch_size, shuffle=False))
            else:
                self.batches = [(torch.randn(self.batch_size, 1, 28, 28, generator=gen),
                                 {t: torch.randint(10, (self.batch_size,), generator=gen) for t in self.task_names})
                                for _ in range(BATCHES_PER_SETTING)]
            self.description = (f"T = 2: MultiLeNet + 2 x ClassificationHead(50, 10, hidden=50, dropout=0.5), "
                                f"batch {self.batch_size} of {args.t2_data} 1x28x28 inputs")
        else:
            self.task_names = [f"attr{i:02d}" for i in range(T40_TASKS)]
            self.tasks = [binary_task(t) for t in self.task_names]
            self.batch_size = args.t40_batch_size
            B = self.batch_size
            self.batches = [(torch.randn(B, 3, T40_SIZE, T40_SIZE, generator=gen),
                             {t: torch.randint(2, (B, 1), generator=gen) for t in self.task_names})
                            for _ in range(BATCHES_PER_SETTING)]
            self.description = (f"T = 40: ResNet-18 (random init) + 40 x MultiLabelHead(512, 1), binary_task each, "
                                f"batch {B} of random 3x{T40_SIZE}x{T40_SIZE} inputs with random 0/1 labels")
        self.seed = args.seed

    def build_model(self) -> MultiTaskModel:
        torch.manual_seed(self.seed)  # every method's copy starts from the same weights
        if self.key == "t2":
            enc = build_encoder("multilenet")
            heads = {t: ClassificationHead(enc.out_features, 10, hidden=50, dropout=0.5) for t in self.task_names}
        else:
            enc = build_encoder("resnet18")
            heads = {t: MultiLabelHead(enc.out_features, 1) for t in self.task_names}
        return MultiTaskModel(enc, heads)


class Runner:
    """One weighting training its own copy of a setting's model: ``step()`` is one training step."""

    def __init__(self, setting: Setting, method: str):
        self.setting, self.method = setting, method
        self.model = setting.build_model()
        self.model.train()
        self.weighting = build_weighting(method, setting.tasks)
        self.weighting.train()
        params = list(self.model.parameters())
        if not self.weighting.own_optimizer:  # as the Trainer: learned weights train with the model
            params += list(self.weighting.parameters())
        self.optimizer = torch.optim.Adam(params, lr=LR)
        self.shared_params = list(self.model.shared_parameters())
        self.count = 0
        self.last_losses: list[float] = []
        self.last_weights: dict[str, float] = {}

    def losses(self, batch):
        inputs, targets = batch
        outputs, rep = self.model(inputs, return_rep=True)
        return {t.name: t.loss(outputs[t.name], t.target(targets)) for t in self.setting.tasks}, rep

    def step(self) -> None:
        batches = self.setting.batches
        losses, rep = self.losses(batches[self.count % len(batches)])
        self.count += 1
        values = torch.stack([loss.detach().float() for loss in losses.values()]).tolist()
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"{self.method} step {self.count}: non-finite loss {values}")
        self.last_weights = self.weighting.backward(losses, shared_params=self.shared_params, rep=rep)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_losses = values


# ----- timing --------------------------------------------------------------------------------------




def timed_block(runner: Runner, steps: int, threads: int) -> float:
    """Mean wall time of ``steps`` consecutive training steps."""
    ensure_threads(threads)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return (time.perf_counter() - t0) / steps


def time_setting(setting: Setting, args, threads: int) -> tuple[dict, dict[str, Runner]]:
    runners = {m: Runner(setting, m) for m in args.methods}
    plan = {}
    for m, runner in runners.items():  # equal first: the others' slowness is measured against it
        first = timed_block(runner, 1, threads)
        slow = m != "equal" and first > max(args.slow_step_s, args.slow_factor * plan["equal"]["warmup_s"][0])
        second = None if slow else timed_block(runner, 1, threads)
        per_step = first if slow else second
        steps = 1 if slow else max(1, min(args.max_steps, round(args.round_seconds / per_step)))
        plan[m] = {"slow": slow, "steps_per_round": steps, "warmup_s": [x for x in (first, second) if x is not None]}
        print(f"  warm-up {m:<12} {', '.join(f'{x * 1000:.1f}' for x in plan[m]['warmup_s'])} ms/step"
              f"{' (slow: ' + str(min(args.slow_rounds, args.rounds)) + ' rounds)' if slow else ''}; "
              f"{steps} step(s) per round", flush=True)

    times: dict[str, list[float | None]] = {m: [] for m in runners}
    methods = list(runners)
    for r in range(args.rounds):
        shift = r % len(methods)
        order = methods[shift:] + methods[:shift]
        for m in order:
            if plan[m]["slow"] and r >= args.slow_rounds:
                times[m].append(None)
                continue
            times[m].append(timed_block(runners[m], plan[m]["steps_per_round"], threads))
        line = ", ".join(f"{m} {times[m][r] * 1000:.1f}" for m in methods if times[m][r] is not None)
        print(f"  round {r + 1}/{args.rounds} (ms/step): {line}", flush=True)

    eq = times["equal"]
    figures = {}
    for m in methods:
        rounds = [i for i, t in enumerate(times[m]) if t is not None]
        mine = [times[m][i] for i in rounds]
        base = [eq[i] for i in rounds]
        ratios = [a / b for a, b in zip(mine, base)]
        med = statistics.median(mine)
        figures[m] = {
            "slow": plan[m]["slow"],
            "steps_per_round": plan[m]["steps_per_round"],
            "warmup_ms": [1000 * x for x in plan[m]["warmup_s"]],
            "rounds_timed": len(rounds),
            "round_ms": [None if t is None else 1000 * t for t in times[m]],
            "median_ms": 1000 * med,
            "min_ms": 1000 * min(mine),
            "max_ms": 1000 * max(mine),
            "spread_max_over_min": max(mine) / min(mine),
            "ratio_of_medians": med / statistics.median(base),
            "round_ratios": ratios,
            "median_round_ratio": statistics.median(ratios),
            "ratio_spread_max_over_min": max(ratios) / min(ratios),
            "last_losses": runners[m].last_losses[:4],
            "last_weights_first4": dict(list(runners[m].last_weights.items())[:4]),
        }
    return figures, runners


def gradient_routes(runner: Runner) -> dict[str, dict]:
    """The ways of computing GradNorm's per-task norms and exact MGDA's per-task gradients, on one retained graph."""
    model = runner.model
    losses, _ = runner.losses(runner.setting.batches[0])
    L = [losses[t] for t in runner.setting.task_names]
    params = [p for p in runner.shared_params if p.requires_grad]
    W = GradNormWeighting.last_shared_weight(runner.shared_params)
    gradnorm = GradNormWeighting(runner.setting.task_names)

    def norms(batched):
        return lambda: per_task_gradients(L, [W], batched=batched)[0].flatten(1).norm(dim=1)

    return {
        "gradnorm_last_shared_weight": {
            "inputs": next(n for n, p in model.encoder.named_parameters() if p is W), "parameters": W.numel(),
            "routes": {"layer": lambda: gradnorm.gradient_norms(L, W), "batched": norms(True), "loop": norms(False)},
        },
        "mgda_shared_parameters": {
            "inputs": f"{len(params)} shared parameter tensors", "parameters": sum(p.numel() for p in params),
            "routes": {"batched": lambda: per_task_gradients(L, params, batched=True),
                       "loop": lambda: per_task_gradients(L, params, batched=False)},
        },
    }


def torch_func_route(runner: Runner):
    """Exact MGDA's per-task gradients with torch.func: ``vjp`` of a functional forward, ``vmap`` over the T cotangents.

    Includes one forward pass of the encoder (the other routes reuse a retained graph).
    """
    model, setting = runner.model, runner.setting
    inputs, targets = setting.batches[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shared = [n for n, p in params.items() if any(p is q for q in runner.shared_params)]
    buffers = dict(model.named_buffers())

    def losses(p):
        outputs = torch.func.functional_call(model, (p, {k: v.clone() for k, v in buffers.items()}), (inputs,))
        return torch.stack([t.loss(outputs[t.name], t.target(targets)) for t in setting.tasks])

    def run():
        L, pullback = torch.func.vjp(losses, params)
        grads = torch.func.vmap(pullback)(torch.eye(L.shape[0]))[0]
        return [grads[n] for n in shared]
    return run


def time_gradient_routes(runner: Runner, rounds: int, threads: int, torch_func_calls: int) -> dict:
    """Alternating calls of every route (rotated order each round); each route's result checked against the loop's."""
    entries = gradient_routes(runner)
    result = {}
    for key, entry in entries.items():
        routes = entry["routes"]
        names = list(routes)
        times = {n: [] for n in names}
        reference = kept = None
        for r in range(rounds):
            kept = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                ensure_threads(threads)
                gc.collect()
                t0 = time.perf_counter()
                value = routes[name]()
                times[name].append(time.perf_counter() - t0)
                if r == 0:
                    kept[name] = value
                del value
            if r == 0:
                reference = kept.pop("loop")
                checks = {n: relative_difference(v, reference) for n, v in kept.items()}
                kept = None
            print(f"  {key} round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
                  flush=True)
        if key == "mgda_shared_parameters" and torch_func_calls:
            run = torch_func_route(runner)
            times["torch_func"] = []
            for c in range(torch_func_calls):
                ensure_threads(threads)
                t0 = time.perf_counter()
                value = run()
                times["torch_func"].append(time.perf_counter() - t0)
                print(f"  {key} torch.func call {c + 1}/{torch_func_calls}: {times['torch_func'][-1]:.1f}s", flush=True)
            checks["torch_func"] = relative_difference(value, reference)
            del value
        medians = {n: statistics.median(v) for n, v in times.items()}
        result[key] = {
            "inputs": entry["inputs"],
            "parameters": entry["parameters"],
            "per_task_gradient_bytes": len(runner.setting.task_names) * entry["parameters"] * 4,
            "seconds": times,
            "median_s": medians,
            "over_loop": {n: medians[n] / medians["loop"] for n in medians if n != "loop"},
            "round_ratios": {n: [a / b for a, b in zip(times[n], times["loop"])] for n in names if n != "loop"},
            "spread_max_over_min": max(max(v) / min(v) for v in times.values()),
            "max_abs_diff_over_max_abs": checks,
        }
        del reference
    return result


def relative_difference(value, reference) -> float:
    """Largest absolute difference over the largest absolute reference entry (tensors or lists of tensors)."""
    value = value if isinstance(value, (list, tuple)) else [value]
    reference = reference if isinstance(reference, (list, tuple)) else [reference]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(value, reference))
    scale = max(b.abs().max().item() for b in reference)
    return diff / scale if scale > 0 else diff


def vmap_fallback_ops(setting: Setting, runner: Runner, samples: int = 2) -> list[str] | None:
    """Backward operations that the legacy vmap behind ``is_grads_batched=True`` runs one task at a time."""
    if not (hasattr(torch._C, "_debug_only_display_vmap_fallback_warnings")
            and hasattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled")):
        return None
    inputs, targets = setting.batches[0]
    batch = (inputs[:samples], {k: v[:samples] for k, v in targets.items()})
    losses, _ = runner.losses(batch)
    L = torch.stack([losses[t] for t in setting.task_names])
    params = [p for p in runner.shared_params if p.requires_grad]
    before = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.autograd.grad(L, params, grad_outputs=torch.eye(L.shape[0]), allow_unused=True,
                                is_grads_batched=True)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(before)
    ops = set()
    for w in caught:
        m = re.search(r"batching rule for (\S+?)\.? You are using", str(w.message))
        if m:
            ops.add(m.group(1).rstrip("."))
    return sorted(ops)


def profile_steps(runners: dict[str, Runner], figures: dict, threads: int, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for m, runner in runners.items():
        if figures[m]["slow"]:
            continue
        ensure_threads(threads)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[m] = {"self_cpu_total_ms": total / 1000,
                  "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count}
                          for e in events[:top]]}
    return out


# ----- memory (one fresh subprocess per method) ----------------------------------------------------






def memory_child(args) -> int:
    """Run in the subprocess: the peak RSS increase of one T = 40 step of ``args.memory_child``."""
    import resource

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("mtl").setLevel(logging.WARNING)
    setting = Setting("t40", args)
    runner = Runner(setting, args.memory_child)
    measured = runner.weighting
    rss_before_steps = proc_status_kib("VmRSS")
    runner.weighting = build_weighting("equal", setting.tasks)  # warm-up: Adam state, allocator
    runner.step()
    runner.weighting = measured
    gc.collect()
    reset = reset_peak_rss()
    base = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    runner.step()
    step_s = time.perf_counter() - t0
    if reset and base is not None and proc_status_kib("VmHWM") is not None:
        how = "VmHWM after resetting it with /proc/self/clear_refs (5) after an equal-weighting warm-up step, minus VmRSS"
        peak, baseline = proc_status_kib("VmHWM"), base
    else:
        how = "getrusage(RUSAGE_SELF).ru_maxrss minus VmRSS before the first step (warm-up step included)"
        peak, baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_before_steps or 0
    print("MEMORY_JSON " + json.dumps({"method": args.memory_child, "baseline_kib": baseline, "peak_kib": peak,
                                       "peak_increase_mib": (peak - baseline) / 1024, "step_s": step_s,
                                       "how": how}), flush=True)
    return 0


def measure_memory(args) -> dict:
    out = {}
    for method in args.memory_methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), MEMORY_CHILD_FLAG, method,
               "--t40-batch-size", str(args.t40_batch_size), "--seed", str(args.seed)]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("MEMORY_JSON ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            out[method] = {"error": f"exit status {proc.returncode}: {' | '.join(tail)}"}
            print(f"  memory {method}: failed ({out[method]['error']})", flush=True)
            continue
        out[method] = json.loads(line[len("MEMORY_JSON "):])
        print(f"  memory {method}: peak RSS +{out[method]['peak_increase_mib']:.0f} MiB during one step "
              f"({out[method]['step_s']:.2f}s)", flush=True)
    return out


# ----- report --------------------------------------------------------------------------------------


def machine_info(threads_default: int, threads_used: int) -> dict:
    return common_machine_info(torch_threads_default=threads_default, torch_threads=threads_used)




def build_targets(settings: dict, grads: dict | None) -> list[dict]:
    rows = []
    for (key, method), limit in STEP_TARGETS.items():
        if key in settings and method in settings[key]["methods"]:
            f = settings[key]["methods"][method]
            rows.append({"target": f"{method} step / equal step at {key.upper()}", "limit": limit,
                         "value": f["ratio_of_medians"], "median_round_ratio": f["median_round_ratio"],
                         "verdict": verdict_at_most(f["ratio_of_medians"], limit)})
    if grads and "mgda_shared_parameters" in grads:
        g = grads["mgda_shared_parameters"]
        value = g["over_loop"]["batched"]
        rows.append({"target": "per_task_gradients batched / loop time at T40 (>= 2x faster)", "limit": GRAD_TARGET,
                     "value": value, "median_round_ratio": statistics.median(g["round_ratios"]["batched"]),
                     "verdict": verdict_at_most(value, GRAD_TARGET)})
    return rows


def noisy_entries(settings: dict, grads: dict | None) -> list[str]:
    bad = []
    for key, s in settings.items():
        for m, f in s["methods"].items():
            if f["rounds_timed"] > 1 and f["spread_max_over_min"] > NOISY_SPREAD:
                bad.append(f"{key}/{m} step times {f['spread_max_over_min']:.2f}x")
            if m != "equal" and f["rounds_timed"] > 1 and f["ratio_spread_max_over_min"] > NOISY_SPREAD:
                bad.append(f"{key}/{m} round ratios {f['ratio_spread_max_over_min']:.2f}x")
    for k, g in (grads or {}).items():
        if len(g["seconds"]["loop"]) > 1 and g["spread_max_over_min"] > NOISY_SPREAD:
            bad.append(f"t40/{k} call times {g['spread_max_over_min']:.2f}x")
    return bad


def write_markdown(path: Path, result: dict) -> None:
    m, cfg = result["machine"], result["config"]
    rows = [
        "# Weighting cost: training-step time relative to equal weighting, and memory",
        "",
        f"CPU, {m['torch_threads']} torch threads, {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, "
        f"{m['memory_gib']} GiB, torch {m['torch']}. Step: {result['timed']}. Per setting: warm-up, then "
        f"{cfg['rounds']} rounds, each running every method (rotated order) for its block of steps; slow methods "
        f"(first step > {cfg['slow_factor']:g}x equal's and > {cfg['slow_step_s']:g} s) take part in "
        f"{cfg['slow_rounds']} rounds. Ratio = median of a "
        "method's per-round ms/step over the median of equal weighting's in the same rounds.",
        "",
        "## Targets",
        "",
        "| target | limit | measured | median of per-round ratios | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for t in result["targets"]:
        rows.append(f"| {t['target']} | <= {t['limit']:.2f} | {t['value']:.3f} | {t['median_round_ratio']:.3f} | "
                    f"**{t['verdict']}** |")
    for key, s in result["settings"].items():
        rows += ["", f"## {key.upper()}: {s['description']}", "",
                 "| method | steps/round | rounds | median ms/step | min | max | ratio vs equal | median round ratio "
                 "| per-round ratios |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, f in s["methods"].items():
            rows.append(f"| {name} | {f['steps_per_round']} | {f['rounds_timed']} | {f['median_ms']:.1f} | "
                        f"{f['min_ms']:.1f} | {f['max_ms']:.1f} | {f['ratio_of_medians']:.3f} | "
                        f"{f['median_round_ratio']:.3f} | {', '.join(f'{r:.2f}' for r in f['round_ratios'])} |")
    g = result.get("per_task_gradients")
    if g:
        rows += ["", "## Per-task gradients at T40: each route against one backward pass per task (loop)", "",
                 ROUTES_TEXT, "",
                 "| inputs | parameters | T x P float32 | route | median (s) | route / loop | max diff / max |",
                 "|---|---:|---:|---|---:|---:|---:|"]
        for k, v in g.items():
            for route, median in v["median_s"].items():
                ratio = v["over_loop"].get(route, 1.0)
                check = v["max_abs_diff_over_max_abs"].get(route)
                rows.append(f"| {k} ({v['inputs']}) | {v['parameters']:,} | "
                            f"{v['per_task_gradient_bytes'] / 2**20:.0f} MiB | {route} | {median:.3f} | {ratio:.3f} | "
                            f"{'' if check is None else f'{check:.1e}'} |")
    fb = result.get("vmap_fallback_ops")
    if fb is not None:
        rows += ["", "Backward operations without a batching rule in the legacy vmap behind "
                 "`is_grads_batched=True` (run one task at a time inside the batched call; torch reports them only "
                 "with `torch._C._debug_only_display_vmap_fallback_warnings(True)`):"]
        for key, ops in fb.items():
            rows.append(f"- {key.upper()}: {', '.join(f'`{o}`' for o in ops) if ops else 'none'}")
    mem = result.get("memory")
    if mem:
        how = next((v["how"] for v in mem.values() if "how" in v), "")
        rows += ["", "## Peak memory of one T40 step (fresh subprocess per method)", "",
                 f"Measured as: {how}.", "",
                 "| method | peak RSS increase (MiB) | vs equal | step (s) |", "|---|---:|---:|---:|"]
        eq = mem.get("equal", {}).get("peak_increase_mib")
        for name, v in mem.items():
            if "error" in v:
                rows.append(f"| {name} | failed: {v['error']} | | |")
                continue
            rel = f"{v['peak_increase_mib'] / eq:.1f}x" if eq else ""
            rows.append(f"| {name} | {v['peak_increase_mib']:.0f} | {rel} | {v['step_s']:.2f} |")
    prof = result.get("profile_t40")
    if prof:
        rows += ["", "## Top operations of one T40 step (torch.profiler, self CPU time)", ""]
        for name, p in prof.items():
            top = "; ".join(f"{e['op']} {e['self_ms']:.0f} ms x{e['calls']}" for e in p["top"][:5])
            rows.append(f"- {name} (total {p['self_cpu_total_ms']:.0f} ms): {top}")
    load = result["load_average_1_5_15min"]
    rows += ["", f"Load average (1, 5, 15 min): start {load['start']}, end {load['end']}."]
    if result["noisy"]:
        rows.append(f"**Noisy run** (spread above {NOISY_SPREAD}x: {'; '.join(result['noisy_reasons'])}); "
                    "treat the ratios with caution.")
    rows += ["", f"Total wall time {result['wall_s']:.0f} s.", "", f"Command: `{result['command']}`", ""]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


# ----- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args)
    logging.getLogger("mtl").setLevel(logging.WARNING)
    threads_default = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = load_average()
    start = time.perf_counter()
    print(f"torch threads: {threads} (default {threads_default}); load average {load_start}", flush=True)

    settings, grads, fallback, prof = {}, None, {}, None
    for key in args.settings:
        setting = Setting(key, args)
        print(f"{key}: {setting.description}", flush=True)
        figures, runners = time_setting(setting, args, threads)
        settings[key] = {"description": setting.description, "batch_size": setting.batch_size,
                         "tasks": len(setting.task_names), "methods": figures}
        fallback[key] = vmap_fallback_ops(setting, runners["equal"])
        if key == "t40":
            if args.profile:
                prof = profile_steps(runners, figures, threads)
            if args.grad_rounds:
                grads = time_gradient_routes(runners["equal"], args.grad_rounds, threads, args.torch_func_calls)
        del runners
        gc.collect()
    memory = {}
    if args.memory_methods:
        print("peak memory of one T = 40 step, one subprocess per method", flush=True)
        memory = measure_memory(args)
    load_end = load_average()

    noisy_reasons = noisy_entries(settings, grads)
    targets = build_targets(settings, grads)
    command = shlex.join(["python", "benchmarks/bench_weighting.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "benchmark": "weighting",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"settings": args.settings, "methods": args.methods, "rounds": args.rounds,
                   "round_seconds": args.round_seconds, "max_steps": args.max_steps,
                   "slow_factor": args.slow_factor, "slow_step_s": args.slow_step_s, "slow_rounds": args.slow_rounds,
                   "grad_rounds": args.grad_rounds, "torch_func_calls": args.torch_func_calls, "t2_batch_size": args.t2_batch_size, "t2_data": args.t2_data,
                   "t40_batch_size": args.t40_batch_size, "memory_methods": args.memory_methods,
                   "profile": args.profile, "threads": args.threads, "seed": args.seed,
                   "optimizer": f"Adam lr {LR}", "device": "cpu", "through_trainer": False,
                   "weighting_bound_to_accelerator": False},
        "timed": TIMED_STEP,
        "machine": machine_info(threads_default, threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": bool(noisy_reasons),
        "noisy_reasons": noisy_reasons,
        "settings": settings,
        "per_task_gradients": grads,
        "vmap_fallback_ops": fallback,
        "memory": memory,
        "profile_t40": prof,
        "targets": targets,
        "wall_s": time.perf_counter() - start,
    }
    out = save_results(args.out_dir, "weighting", result, write_markdown)

    print()
    print(f"timed step: {TIMED_STEP}")
    for key, s in settings.items():
        print(f"\n{key.upper()}: {s['description']}")
        print(f"{'method':<12} {'steps':>5} {'rounds':>6} {'median ms':>10} {'min':>8} {'max':>8} {'ratio':>7} "
              f"{'med rnd':>8}")
        for name, f in s["methods"].items():
            print(f"{name:<12} {f['steps_per_round']:>5} {f['rounds_timed']:>6} {f['median_ms']:>10.1f} "
                  f"{f['min_ms']:>8.1f} {f['max_ms']:>8.1f} {f['ratio_of_medians']:>7.3f} "
                  f"{f['median_round_ratio']:>8.3f}")
    if grads:
        print("\nper-task gradients at T40, each route against the per-task loop:")
        for k, v in grads.items():
            print(f"  {k}: loop {v['median_s']['loop']:.3f}s; " + "; ".join(
                f"{n} {v['median_s'][n]:.3f}s = {r:.3f}x loop (max diff/max {v['max_abs_diff_over_max_abs'][n]:.1e})"
                for n, r in v["over_loop"].items()))
    for key, ops in fallback.items():
        if ops is not None:
            print(f"legacy-vmap fallback ops at {key.upper()}: {', '.join(ops) if ops else 'none'}")
    if memory:
        eq = memory.get("equal", {}).get("peak_increase_mib")
        for name, v in memory.items():
            if "error" not in v:
                rel = f" ({v['peak_increase_mib'] / eq:.1f}x equal)" if eq else ""
                print(f"memory {name}: +{v['peak_increase_mib']:.0f} MiB peak RSS during one T40 step{rel}")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    if noisy_reasons:
        advice = "with more --rounds" + ("" if threads == 1 else ", or with --threads 1 (several torch threads per "
                                         "process make busy-machine timings far noisier)")
        print(f"NOISY: {'; '.join(noisy_reasons)} (max / min within this run). The machine was busy; rerun when "
              f"it is quiet, {advice}.")
    print(f"results: {out / 'weighting.json'}, {out / 'weighting.md'} ({result['wall_s']:.0f}s)")
    for t in targets:
        print(f"{t['verdict']}: {t['target']} = {t['value']:.3f} (target <= {t['limit']:.2f})")
    mg = {k: s["methods"]["mgda"]["ratio_of_medians"] for k, s in settings.items() if "mgda" in s["methods"]}
    if mg:
        print("exact MGDA step / equal step (no target): "
              + ", ".join(f"{k.upper()} {v:.2f}x" for k, v in mg.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
