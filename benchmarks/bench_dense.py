"""What does one training step of the 3-task NYUv2 model cost per weighting, and what does bf16 buy on a GPU?

The model is the one ``scripts/train_nyuv2.py`` builds for LibMTL's protocol: a dilated
segmentation-models-pytorch encoder (``build_encoder("smp:resnet50", output_stride=16)``,
random weights) and one ``DenseHead`` per task (a DeepLabV3+ decoder with 256 channels,
then a 1x1 prediction layer, upsampled to the input resolution): segmentation (13 logits),
depth (1 channel) and surface normals (3 channels, unit length), with the tasks of
``nyuv2_tasks()``. The inputs are random, of the real shapes and dtypes at 288 x 384:
image float32 3xHxW (standard normal), segmentation int64 HxW in -1..12 (-1: ignored
pixel), depth float32 1xHxW in 0.5..10 with about 5% zeros (missing pixels), normals
float32 3xHxW of unit length. A few batches are built before timing and cycled, so no
data loading is timed.

One step: forward with ``return_rep=True``; ``Task.loss`` of each task (with its target
checks); ``weighting.backward(losses, shared_params=list(model.shared_parameters()),
rep=rep)`` with the weighting not bound to an Accelerator (its backward passes call
``loss.backward()``); ``Adam.step`` (lr 1e-4, weight decay 1e-5, the protocol's);
``zero_grad(set_to_none=True)``. Each weighting trains its own copy of the model, all
copies starting from the same weights; learned task weights (uncertainty) train with
the model's parameters, GradNorm's with its own optimizer, as in the Trainer.

Default: the real model at batch 2 on the CPU. The protocol's batch is 8; at batch 2 one
round of the four methods takes about 20 s on a 2-core CPU, and a whole default run a
few minutes (``--batch-size 8``, or ``--device cuda`` on a GPU, for the protocol size).
Batch 1 is refused: the ASPP pooling branch has a BatchNorm on a 1x1 map, which needs
more than one sample in training mode.

Measured:

1. Step time of ``mgda_ub``, ``gradnorm`` and ``uncertainty`` relative to ``equal``
   (wall clock, ``time.perf_counter``, CUDA synchronised on a GPU): ``--warmup-steps``
   untimed steps per method, then ``--rounds`` rounds; each round runs every method for
   ``--steps-per-round`` steps, in an order rotated from round to round, so that every
   method sees the same machine load. A method's figure in a round is its mean step time
   there; its ratio is the median of its figures over the median of equal weighting's.
   Per-round ratios (method / equal in the same round) are reported too.
   Target: MGDA-UB <= 1.15x equal.
2. Where MGDA-UB's time goes (``--breakdown-rounds``): on one forward graph of its model,
   the forward pass with the losses, the graph walk that finds the heads' parameters and
   the feature maps they read, the per-task backward passes through the heads
   (``split_gradients``) as a loop (what MGDA-UB runs) and batched (vmap), the Gram matrix
   with the min-norm solve, and the pass through the encoder; beside them the plain
   backward of the loss sum on a fresh graph of the same batch (what equal weighting runs).
3. Peak memory of one step per method, each method in a fresh subprocess: on the CPU the
   kernel's peak-RSS mark (VmHWM) is reset after the model, weighting, optimizer and batches
   are built (``/proc/self/clear_refs`` with ``5``), VmRSS is read (the post-build baseline),
   one step runs and VmHWM is read: the peak RSS increase of the first step (which also
   allocates the gradients and Adam's state). The mark is reset again and a second step
   measured the same way (steady state: Adam's state is already there). The subprocess runs
   with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc gives every freed block above
   128 KiB back to the kernel and RSS follows the memory in use instead of what the
   allocator keeps. Where the mark cannot be reset, ``getrusage`` maxrss minus the
   post-build VmRSS is used for the first step and the second is not measured (the JSON
   says which). On a GPU: ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``, minus ``memory_allocated`` before the step.
4. With a CUDA GPU only: training images/s in fp32 (``mixed_precision="no"``) against bf16
   (``mixed_precision="bf16"``) through ``accelerate``: each side has its own Accelerator,
   prepared model and optimizer and a bound equal weighting, at ``--precision-batch-size``
   (8, the protocol's); warm-up, then alternating rounds of ``--precision-steps`` steps.
   Target: bf16 >= 1.8x fp32. Without a GPU this is skipped (``--precision-on-cpu`` runs
   it on the CPU instead, to check the code path; that is not the measurement the target is
   about).

Only ratios measured in the same run are meaningful on a noisy machine; a run is flagged
noisy when a method's per-round figures or per-round ratios vary by more than 1.5x.
Results go to ``benchmarks/results/dense.json`` and ``.md`` (atomic writes). The exit
status is 0 whether or not the targets are met.

  python benchmarks/bench_dense.py
  python benchmarks/bench_dense.py --rounds 9 --threads 1
  python benchmarks/bench_dense.py --device cuda --batch-size 8 --steps-per-round 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from common import (ensure_threads, load_average, parse_choices, proc_status_kib, reset_peak_rss,  # noqa: E402
                    save_results, sync, verdict_at_most)
from common import machine_info as common_machine_info  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.heads import DenseHead  # noqa: E402
from mtl.io import atomic_write  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import nyuv2_tasks  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402
from mtl.weighting.gradients import gram_matrix, split_gradients  # noqa: E402
from mtl.weighting.graph import walk_to_boundary  # noqa: E402

METHODS = ("equal", "mgda_ub", "gradnorm", "uncertainty")
OUT_CHANNELS = {"segmentation": 13, "depth": 1, "normal": 3}  # as scripts/train_nyuv2.py
NUM_CLASSES = 13
DECODER = "deeplabv3plus"
LR, WEIGHT_DECAY = 1e-4, 1e-5  # LibMTL's NYUv2 protocol
PROTOCOL_BATCH = 8
DEPTH_ZERO_FRACTION = 0.05
BATCHES = 2  # fixed batches, cycled
MGDA_UB_TARGET = 1.15  # mgda_ub step / equal step
BF16_TARGET = 1.8  # bf16 images/s / fp32 images/s
NOISY_SPREAD = 1.5
CHILD_MMAP_THRESHOLD = 131072
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MEMORY_CHILD_FLAG = "--memory-child"

TIMED_STEP = (
    "forward (return_rep=True), Task.loss per task, weighting.backward(losses, "
    "shared_params=list(model.shared_parameters()), rep=rep) with the weighting unbound (no Accelerator), "
    f"Adam.step (lr {LR}, weight decay {WEIGHT_DECAY}), zero_grad(set_to_none=True); batches prebuilt, no data loading"
)


# ----- arguments ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one training step of the 3-task NYUv2 model (dilated smp encoder + DeepLabV3+ heads, "
                    "288x384) per weighting relative to equal weighting (alternating rounds in one run), MGDA-UB's "
                    "extra work, the peak memory of a step per method, and, on a CUDA GPU, fp32 vs bf16 images/s "
                    f"through accelerate. Targets: MGDA-UB <= {MGDA_UB_TARGET}x equal; bf16 >= {BF16_TARGET}x fp32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--encoder", default="smp:resnet50", help="segmentation-models-pytorch encoder, smp:<name>")
    g.add_argument("--output-stride", type=int, default=16, help="encoder output stride (16: dilated, as LibMTL)")
    g.add_argument("--decoder-channels", type=int, default=256, help="DeepLabV3+ decoder channels")
    g.add_argument("--batch-size", type=int, default=2,
                   help=f"batch size of the step-time and memory measurements (the protocol's is {PROTOCOL_BATCH})")
    g.add_argument("--height", type=int, default=288, help="input height")
    g.add_argument("--width", type=int, default=384, help="input width")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device of the step-time, breakdown and memory measurements")
    g = p.add_argument_group("step time")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated weightings (equal is always included); from {', '.join(METHODS)}")
    g.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per method before the rounds")
    g.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    g.add_argument("--steps-per-round", type=int, default=1, help="consecutive steps of one method per round")
    g.add_argument("--breakdown-rounds", type=int, default=3,
                   help="rounds of the MGDA-UB breakdown (forward, per-task passes looped and batched, "
                        "Gram + solve, backward of the sum, heads-only per-task gradients); 0: skip")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-methods", default=",".join(METHODS),
                   help="weightings whose step peak memory is measured, each in a fresh subprocess ('' or 'none': skip)")
    g = p.add_argument_group("fp32 vs bf16 (CUDA GPU only)")
    g.add_argument("--precision-batch-size", type=int, default=PROTOCOL_BATCH, help="batch size of the comparison")
    g.add_argument("--precision-warmup-steps", type=int, default=5, help="untimed steps per precision")
    g.add_argument("--precision-rounds", type=int, default=5, help="alternating timed rounds")
    g.add_argument("--precision-steps", type=int, default=10, help="steps per precision per round")
    g.add_argument("--precision-on-cpu", action="store_true",
                   help="without a GPU, run the comparison on the CPU anyway (checks the code path; slow, and not "
                        "the measurement the target is about)")
    g.add_argument("--no-precision", action="store_true", help="skip the comparison even on a GPU")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for everything (None: leave torch's default; the count used is recorded)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data and of the model initialisation")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder for dense.json and dense.md")
    p.add_argument(MEMORY_CHILD_FLAG, default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)

    for name in ("rounds", "steps_per_round", "precision_rounds", "precision_steps", "decoder_channels",
                 "height", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "breakdown_rounds", "precision_warmup_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "precision_batch_size"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2: the DeepLabV3+ ASPP pooling branch has a BatchNorm "
                    "on a 1x1 map, which needs more than one sample in training mode")
    if args.height % 32 or args.width % 32:
        p.error(f"--height and --width must be multiples of 32 (the encoder's depth 5), got {args.height}x{args.width}")
    if not args.encoder.startswith("smp:"):
        p.error(f"--encoder must be a segmentation-models-pytorch encoder, smp:<name>; got {args.encoder!r}")
    if args.output_stride not in (8, 16):
        p.error(f"--output-stride must be 8 or 16 for DeepLabV3+ decoders, got {args.output_stride}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is present (torch.cuda.is_available() is False)")
    methods = parse_choices(p, "--methods", args.methods, METHODS)
    args.methods = ["equal"] + [m for m in methods if m != "equal"]
    mem = args.memory_methods.strip()
    args.memory_methods = [] if mem in ("", "none") else parse_choices(p, "--memory-methods", mem, METHODS)
    if args.memory_child is not None and args.memory_child not in METHODS:
        p.error(f"unknown weighting {args.memory_child!r}")
    return args




# ----- model, data, one training step --------------------------------------------------------------


def make_batch(batch_size: int, height: int, width: int, gen: torch.Generator):
    """One NYUv2-shaped batch: (image, {segmentation, depth, normal}), real dtypes and value ranges."""
    B, H, W = batch_size, height, width
    image = torch.randn(B, 3, H, W, generator=gen)
    segmentation = torch.randint(-1, NUM_CLASSES, (B, H, W), generator=gen)  # int64, -1 = ignored
    depth = torch.rand(B, 1, H, W, generator=gen) * 9.5 + 0.5
    depth[torch.rand(B, 1, H, W, generator=gen) < DEPTH_ZERO_FRACTION] = 0.0  # missing pixels
    normal = F.normalize(torch.randn(B, 3, H, W, generator=gen), dim=1)
    return image, {"segmentation": segmentation, "depth": depth, "normal": normal}


class Setup:
    """Model factory, tasks and prebuilt batches (on ``device``) of one measurement."""

    def __init__(self, args, device: torch.device, batch_size: int):
        self.args, self.device, self.batch_size = args, torch.device(device), batch_size
        self.tasks = nyuv2_tasks(NUM_CLASSES)
        gen = torch.Generator().manual_seed(args.seed)
        self.batches = []
        for _ in range(BATCHES):
            image, targets = make_batch(batch_size, args.height, args.width, gen)
            self.batches.append((image.to(self.device), {k: v.to(self.device) for k, v in targets.items()}))

    def build_model(self) -> MultiTaskModel:
        a = self.args
        torch.manual_seed(a.seed)  # every copy starts from the same weights
        encoder = build_encoder(a.encoder, pretrained=False, output_stride=a.output_stride)
        heads = {t: DenseHead(encoder.out_channels, OUT_CHANNELS[t], DECODER, a.output_stride, t, a.decoder_channels)
                 for t in OUT_CHANNELS}
        return MultiTaskModel(encoder, heads)


def describe(args, batch_size: int, device: str) -> str:
    return (f"{args.encoder} (random init, output stride {args.output_stride}) + 3 x DenseHead({DECODER}, "
            f"{args.decoder_channels} channels): segmentation 13, depth 1, normal 3; batch {batch_size} of "
            f"3x{args.height}x{args.width} on {device}")


class Runner:
    """One weighting training its own copy of the model: ``step()`` is one training step.

    With an ``accelerator`` the model and optimizer are prepared by it and the weighting is
    bound to it (mixed precision, ``accelerator.backward``), as in the Trainer.
    """

    def __init__(self, setup: Setup, method: str, accelerator=None):
        self.setup, self.method = setup, method
        model = setup.build_model().to(setup.device)
        model.train()
        self.weighting = build_weighting(method, setup.tasks).to(setup.device)
        self.weighting.train()
        self.shared_params = list(model.shared_parameters())
        params = list(model.parameters())
        if not self.weighting.own_optimizer:  # as the Trainer: learned weights train with the model
            params += list(self.weighting.parameters())
        optimizer = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY)
        if accelerator is not None:
            self.weighting.bind(accelerator)
            model, optimizer = accelerator.prepare(model, optimizer)
        self.model, self.optimizer = model, optimizer
        self.count = 0
        self.last_losses: dict[str, torch.Tensor] = {}
        self.last_weights: dict[str, float] = {}

    def losses(self, batch):
        image, targets = batch
        outputs, rep = self.model(image, return_rep=True)
        return {t.name: t.loss(outputs[t.name], t.target(targets)) for t in self.setup.tasks}, rep

    def step(self) -> None:
        batches = self.setup.batches
        losses, rep = self.losses(batches[self.count % len(batches)])
        self.count += 1
        self.last_weights = self.weighting.backward(losses, shared_params=self.shared_params, rep=rep)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_losses = {t: v.detach() for t, v in losses.items()}

    def loss_values(self) -> dict[str, float]:
        return {t: float(v) for t, v in self.last_losses.items()}


# ----- timing --------------------------------------------------------------------------------------






def timed_block(runner: Runner, steps: int, threads: int) -> float:
    """Mean wall time of ``steps`` consecutive training steps."""
    ensure_threads(threads)
    gc.collect()
    device = runner.setup.device
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def time_methods(setup: Setup, args, threads: int) -> tuple[dict, dict[str, Runner]]:
    runners = {}
    for m in args.methods:
        t0 = time.perf_counter()
        runners[m] = Runner(setup, m)
        print(f"  built {m} ({time.perf_counter() - t0:.1f}s)", flush=True)
    warmup = {}
    for m, runner in runners.items():
        warmup[m] = [timed_block(runner, 1, threads) for _ in range(args.warmup_steps)]
        print(f"  warm-up {m:<12} {', '.join(f'{x:.2f}' for x in warmup[m]) or '-'} s/step", flush=True)

    methods = list(runners)
    times: dict[str, list[float]] = {m: [] for m in methods}
    orders = []
    for r in range(args.rounds):
        shift = r % len(methods)
        order = methods[shift:] + methods[:shift]
        orders.append(order)
        for m in order:
            times[m].append(timed_block(runners[m], args.steps_per_round, threads))
        line = ", ".join(f"{m} {times[m][r]:.2f}" for m in methods)
        ratio = (f"; mgda_ub / equal {times['mgda_ub'][r] / times['equal'][r]:.3f}"
                 if "mgda_ub" in times else "")
        print(f"  round {r + 1}/{args.rounds} (s/step): {line}{ratio}", flush=True)

    eq = times["equal"]
    figures = {}
    for m in methods:
        mine = times[m]
        ratios = [a / b for a, b in zip(mine, eq)]
        med = statistics.median(mine)
        figures[m] = {
            "warmup_s": warmup[m],
            "round_s": mine,
            "median_s": med,
            "min_s": min(mine),
            "max_s": max(mine),
            "spread_max_over_min": max(mine) / min(mine),
            "images_per_s": setup.batch_size / med,
            "ratio_of_medians": med / statistics.median(eq),
            "round_ratios": ratios,
            "median_round_ratio": statistics.median(ratios),
            "ratio_of_minimums": min(mine) / min(eq),
            "ratio_spread_max_over_min": max(ratios) / min(ratios),
            "last_losses": runners[m].loss_values(),
            "last_weights": runners[m].last_weights,
        }
    return {"methods": figures, "round_orders": orders}, runners


def mgda_ub_breakdown(runner: Runner, rounds: int, threads: int) -> dict:
    """MGDA-UB's phases, timed on one forward graph per round (no optimizer step), beside equal's backward."""
    model, weighting, device = runner.model, runner.weighting, runner.setup.device
    phases = ("forward_and_losses", "graph_walk", "per_task_passes_loop", "per_task_passes_batched",
              "gram_and_solve", "encoder_pass", "backward_of_sum")
    times: dict[str, list[float]] = {k: [] for k in phases}

    def clock(key, fn):
        ensure_threads(threads)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times[key].append(time.perf_counter() - t0)
        return out

    def one_round(r: int) -> dict:
        """Times the phases once; the graph and gradients of the round die on return."""
        batch = runner.setup.batches[r % len(runner.setup.batches)]
        losses, rep = clock("forward_and_losses", lambda: runner.losses(batch))
        per_task = weighting.ordered(losses)
        parts = weighting._differentiable_parts(rep)
        heads, reps = clock("graph_walk", lambda: walk_to_boundary(per_task, parts))
        results = {}
        for mode in (("batched", "loop") if r % 2 == 0 else ("loop", "batched")):
            results[mode] = clock(f"per_task_passes_{mode}",
                                  lambda: split_gradients(per_task, reps, heads, batched=(mode == "batched")))
        info = {}
        if r == 0:
            pairs = [*zip(results["batched"][0], results["loop"][0]), *zip(results["batched"][1], results["loop"][1])]
            info["max_diff"] = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in pairs)
            info["maps_read"] = [list(z.shape) for z in reps]
            info["maps_returned"] = [list(z.shape) for z in parts]
            info["head_parameters"] = sum(p.numel() for p in heads)
        dzs, head_grads = results.pop("loop")
        results.clear()
        alpha = clock("gram_and_solve",
                      lambda: weighting.solve(gram_matrix(dzs), torch.stack([x.detach() for x in per_task])))
        combined = [torch.tensordot(alpha.to(dz.dtype), dz, dims=1) for dz in dzs]
        clock("encoder_pass", lambda: weighting.apply_gradients(reps + heads, combined + head_grads))
        model.zero_grad(set_to_none=True)
        # equal weighting's backward on a fresh graph of the same batch
        losses, _ = runner.losses(batch)
        clock("backward_of_sum", lambda: sum(losses.values()).backward())
        model.zero_grad(set_to_none=True)
        return info

    first = {}
    for r in range(rounds):
        gc.collect()
        info = one_round(r)
        first = first or info
        print(f"  breakdown round {r + 1}/{rounds} (s): "
              + ", ".join(f"{k} {times[k][-1]:.2f}" for k in phases), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "times_s": times,
        "median_s": med,
        "batched_over_loop": med["per_task_passes_batched"] / med["per_task_passes_loop"],
        "batched_vs_loop_max_diff_over_max": first["max_diff"],
        "maps_read_by_heads": first["maps_read"],
        "maps_returned": first["maps_returned"],
        "head_parameters": first["head_parameters"],
        "mgda_ub_backward_over_equal_backward":
            (med["graph_walk"] + med["per_task_passes_loop"] + med["gram_and_solve"] + med["encoder_pass"])
            / med["backward_of_sum"],
    }


# ----- memory (one fresh subprocess per method) ----------------------------------------------------






def memory_child(args) -> int:
    """Run in the subprocess: the peak memory increase of one step (first, then steady) of ``args.memory_child``."""
    import resource

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("mtl").setLevel(logging.WARNING)
    device = torch.device(args.device)
    setup = Setup(args, device, args.batch_size)
    runner = Runner(setup, args.memory_child)
    result = {"method": args.memory_child, "device": args.device,
              "mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    for key in ("first_step", "second_step"):
        gc.collect()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            how = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
        else:
            reset = reset_peak_rss()
            base = proc_status_kib("VmRSS")
            if base is None:
                result[key] = {"error": "no VmRSS in /proc/self/status"}
                continue
            if reset:
                how = "VmHWM after resetting it with /proc/self/clear_refs (5), minus VmRSS before the step"
            elif key == "first_step":
                how = "getrusage(RUSAGE_SELF).ru_maxrss minus VmRSS after the build (the peak mark could not be reset)"
            else:
                result[key] = {"error": "the peak-RSS mark cannot be reset here (/proc/self/clear_refs)"}
                continue
        t0 = time.perf_counter()
        runner.step()
        sync(device)
        step_s = time.perf_counter() - t0
        if device.type == "cuda":
            peak_mib, base_mib = torch.cuda.max_memory_allocated(device) / 2**20, base / 2**20
        else:
            hwm = proc_status_kib("VmHWM") if "VmHWM" in how else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_mib, base_mib = hwm / 1024, base / 1024
        result[key] = {"baseline_mib": base_mib, "peak_mib": peak_mib, "peak_increase_mib": peak_mib - base_mib,
                       "step_s": step_s, "how": how}
    print("MEMORY_JSON " + json.dumps(result), flush=True)
    return 0


def measure_memory(args) -> dict:
    out = {}
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(CHILD_MMAP_THRESHOLD))
    for method in args.memory_methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), MEMORY_CHILD_FLAG, method,
               "--encoder", args.encoder, "--output-stride", str(args.output_stride),
               "--decoder-channels", str(args.decoder_channels), "--batch-size", str(args.batch_size),
               "--height", str(args.height), "--width", str(args.width), "--device", args.device,
               "--seed", str(args.seed)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("MEMORY_JSON ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            out[method] = {"error": f"exit status {proc.returncode}: {' | '.join(tail)}"}
            print(f"  memory {method}: failed ({out[method]['error']})", flush=True)
            continue
        out[method] = json.loads(line[len("MEMORY_JSON "):])
        first, second = out[method]["first_step"], out[method].get("second_step", {})
        if "peak_increase_mib" not in first:
            out[method] = {"error": first.get("error", "no measurement")}
            print(f"  memory {method}: failed ({out[method]['error']})", flush=True)
            continue
        steady = f", second step +{second['peak_increase_mib']:.0f} MiB" if "peak_increase_mib" in second else ""
        print(f"  memory {method}: first step +{first['peak_increase_mib']:.0f} MiB over the post-build baseline"
              f"{steady} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


# ----- fp32 vs bf16 through accelerate (CUDA GPU) --------------------------------------------------


def fresh_accelerator(mixed_precision: str, cpu: bool):
    """An Accelerator with its own mixed-precision setting (accelerate keeps process-wide singletons)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def first_conv_dtype_probe(model: torch.nn.Module) -> dict:
    """Records the output dtype of the encoder's first convolution (shows whether autocast is on)."""
    seen: dict = {}
    conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))

    def hook(module, inputs, output):
        seen.setdefault("dtype", str(output.dtype).replace("torch.", ""))

    conv.register_forward_hook(hook)
    return seen


def time_precision(args, threads: int) -> dict:
    on_gpu = torch.cuda.is_available()
    if args.no_precision:
        return {"skipped": "--no-precision"}
    if not on_gpu and not args.precision_on_cpu:
        return {"skipped": "no GPU is present (torch.cuda.is_available() is False)"}
    sides = {"fp32": "no", "bf16": "bf16"}
    runners, probes = {}, {}
    for side, mp in sides.items():
        accelerator = fresh_accelerator(mp, cpu=not on_gpu)
        setup = Setup(args, accelerator.device, args.precision_batch_size)
        runner = Runner(setup, "equal", accelerator=accelerator)
        probes[side] = first_conv_dtype_probe(accelerator.unwrap_model(runner.model))
        runners[side] = runner
    device = runners["fp32"].setup.device
    B = args.precision_batch_size
    warmup = {side: [timed_block(r, 1, threads) for _ in range(args.precision_warmup_steps)]
              for side, r in runners.items()}
    print("  warm-up (s/step): " + ", ".join(f"{s} {', '.join(f'{x:.3f}' for x in w) or '-'}"
                                              for s, w in warmup.items()), flush=True)
    ips: dict[str, list[float]] = {side: [] for side in runners}
    for r in range(args.precision_rounds):
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        for side in order:
            ips[side].append(B / timed_block(runners[side], args.precision_steps, threads))
        print(f"  precision round {r + 1}/{args.precision_rounds} (images/s): fp32 {ips['fp32'][-1]:.1f}, "
              f"bf16 {ips['bf16'][-1]:.1f}", flush=True)
    med = {side: statistics.median(v) for side, v in ips.items()}
    ratios = [b / f for f, b in zip(ips["fp32"], ips["bf16"])]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "on_gpu": on_gpu,
        "batch_size": B,
        "weighting": "equal (bound to the Accelerator)",
        "accelerate_mixed_precision": sides,
        "first_conv_output_dtype": {side: p.get("dtype") for side, p in probes.items()},
        "warmup_s": warmup,
        "images_per_s": ips,
        "median_images_per_s": med,
        "bf16_over_fp32": med["bf16"] / med["fp32"],
        "round_ratios": ratios,
        "median_round_ratio": statistics.median(ratios),
        "spread_max_over_min": max(max(v) / min(v) for v in ips.values()),
        "last_losses": {side: r.loss_values() for side, r in runners.items()},
    }
    if device.type == "cuda":
        result["tf32"] = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "float32_matmul_precision": torch.get_float32_matmul_precision(),
                          "cudnn_benchmark": torch.backends.cudnn.benchmark}
        result["peak_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del runners
    gc.collect()
    return result


# ----- report --------------------------------------------------------------------------------------


def machine_info(threads_default: int, threads_used: int) -> dict:
    import accelerate
    import segmentation_models_pytorch as smp

    return common_machine_info(accelerate=accelerate.__version__, segmentation_models_pytorch=smp.__version__,
                               torch_threads_default=threads_default, torch_threads=threads_used)




def verdict_at_least(value: float, limit: float) -> str:
    return "PASS" if value >= limit else "BELOW TARGET"


def build_targets(steps: dict, precision: dict) -> list[dict]:
    rows = []
    f = steps["methods"].get("mgda_ub")
    if f is not None:
        rows.append({"target": "mgda_ub step / equal step", "limit": f"<= {MGDA_UB_TARGET:.2f}",
                     "value": f["ratio_of_medians"], "median_round_ratio": f["median_round_ratio"],
                     "verdict": verdict_at_most(f["ratio_of_medians"], MGDA_UB_TARGET)})
    if "bf16_over_fp32" in precision:
        value = precision["bf16_over_fp32"]
        rows.append({"target": "bf16 images/s / fp32 images/s (accelerate)", "limit": f">= {BF16_TARGET:.2f}",
                     "value": value, "median_round_ratio": precision["median_round_ratio"],
                     "verdict": verdict_at_least(value, BF16_TARGET) if precision["on_gpu"]
                     else "NOT MEASURED ON A GPU (CPU run of the code path)"})
    return rows


def noisy_entries(steps: dict, precision: dict) -> list[str]:
    bad = []
    for m, f in steps["methods"].items():
        if len(f["round_s"]) > 1 and f["spread_max_over_min"] > NOISY_SPREAD:
            bad.append(f"{m} step times {f['spread_max_over_min']:.2f}x")
        if m != "equal" and len(f["round_s"]) > 1 and f["ratio_spread_max_over_min"] > NOISY_SPREAD:
            bad.append(f"{m} round ratios {f['ratio_spread_max_over_min']:.2f}x")
    if precision.get("spread_max_over_min", 1.0) > NOISY_SPREAD:
        bad.append(f"precision images/s {precision['spread_max_over_min']:.2f}x")
    return bad


def write_markdown(path: Path, result: dict) -> None:
    m, cfg, steps = result["machine"], result["config"], result["step_time"]
    rows = [
        "# NYUv2 dense model: training-step time per weighting, memory, fp32 vs bf16",
        "",
        f"{steps['description']}. {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, accelerate {m['accelerate']}, "
        f"segmentation-models-pytorch {m['segmentation_models_pytorch']}.",
        "",
        f"Batch {cfg['batch_size']} on {cfg['device']}: {cfg['batch_note']}",
        "",
        f"Step: {result['timed']}. {cfg['warmup_steps']} warm-up step(s) per method, then {cfg['rounds']} rounds, "
        f"each running every method (rotated order) for {cfg['steps_per_round']} step(s). Ratio = median of a "
        "method's per-round s/step over the median of equal weighting's.",
        "",
        "## Targets",
        "",
        "| target | limit | measured | median of per-round ratios | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for t in result["targets"]:
        rows.append(f"| {t['target']} | {t['limit']} | {t['value']:.3f} | {t['median_round_ratio']:.3f} | "
                    f"**{t['verdict']}** |")
    if not result["precision"].get("on_gpu") and "skipped" in result["precision"]:
        rows.append(f"| bf16 images/s / fp32 images/s (accelerate) | >= {BF16_TARGET:.2f} | - | - | "
                    f"**SKIPPED**: {result['precision']['skipped']} |")
    rows += ["", "## Step time", "",
             "| method | median s/step | min | max | images/s | ratio vs equal | median round ratio "
             "| ratio of minimums | per-round ratios |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, f in steps["methods"].items():
        rows.append(f"| {name} | {f['median_s']:.2f} | {f['min_s']:.2f} | {f['max_s']:.2f} | {f['images_per_s']:.2f} | "
                    f"{f['ratio_of_medians']:.3f} | {f['median_round_ratio']:.3f} | {f['ratio_of_minimums']:.3f} | "
                    f"{', '.join(f'{r:.2f}' for r in f['round_ratios'])} |")
    bd = result.get("mgda_ub_breakdown")
    if bd:
        med = bd["median_s"]
        rows += ["", f"## Where MGDA-UB's time goes (one forward graph, median of {bd['rounds']} rounds)", "",
                 "| phase | median s |", "|---|---:|"]
        for k, v in med.items():
            rows.append(f"| {k.replace('_', ' ')} | {v:.2f} |")
        shapes = "; ".join("x".join(map(str, m)) for m in bd["maps_read_by_heads"])
        rows += ["", f"Per task, one backward pass from its own loss through its own head gives its gradient at "
                 f"the feature maps the heads read ({shapes}; {len(bd['maps_returned'])} maps returned) and its "
                 f"head's gradient ({bd['head_parameters']:,} head parameters); then one pass through the encoder "
                 f"(`encoder pass`). The same passes batched over the tasks (vmap) take "
                 f"{bd['batched_over_loop']:.2f}x the loop (max difference / max "
                 f"{bd['batched_vs_loop_max_diff_over_max']:.1e}). MGDA-UB's whole backward (walk, passes, Gram and "
                 f"solve, encoder pass) / equal's backward of the loss sum: "
                 f"{bd['mgda_ub_backward_over_equal_backward']:.2f}."]
    mem = result.get("memory")
    if mem:
        how = next((v["first_step"]["how"] for v in mem.values() if "first_step" in v), "")
        rows += ["", "## Peak memory of one step (fresh subprocess per method)", "",
                 f"Measured as: {how}" + (f"; subprocess environment MALLOC_MMAP_THRESHOLD_="
                                          f"{next(iter(mem.values())).get('mmap_threshold_env')}"
                                          if cfg["device"] == "cpu" else "") + ". "
                 "First step: over the post-build baseline (model, weighting, optimizer, batches built; the step "
                 "also allocates gradients and Adam's state). Second step: over the memory before it (steady state).",
                 "", "| method | first step (MiB) | vs equal | second step (MiB) | vs equal | baseline (MiB) |",
                 "|---|---:|---:|---:|---:|---:|"]
        eq = mem.get("equal", {})
        for name, v in mem.items():
            if "error" in v:
                rows.append(f"| {name} | failed: {v['error']} | | | | |")
                continue
            cells = []
            for key in ("first_step", "second_step"):
                x, e = v.get(key, {}), eq.get(key, {})
                if "peak_increase_mib" not in x:
                    cells += ["-", "-"]
                    continue
                rel = (f"{x['peak_increase_mib'] / e['peak_increase_mib']:.2f}x"
                       if e.get("peak_increase_mib") else "")
                cells += [f"{x['peak_increase_mib']:.0f}", rel]
            rows.append(f"| {name} | {' | '.join(cells)} | {v['first_step']['baseline_mib']:.0f} |")
    p = result["precision"]
    rows += ["", "## fp32 vs bf16 through accelerate", ""]
    if "skipped" in p:
        rows.append(f"Skipped: {p['skipped']}.")
    else:
        rows += [f"{p['device']}, batch {p['batch_size']}, {p['weighting']}; first convolution's output dtype "
                 f"{p['first_conv_output_dtype']}" + (f"; TF32 settings {p['tf32']}" if "tf32" in p else "")
                 + ("" if p["on_gpu"] else " (**CPU run of the code path, not the GPU measurement**)") + ".", "",
                 "| precision | median images/s | per-round images/s |", "|---|---:|---|"]
        for side, v in p["images_per_s"].items():
            rows.append(f"| {side} | {p['median_images_per_s'][side]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
        rows += ["", f"bf16 / fp32: {p['bf16_over_fp32']:.3f} (per-round ratios "
                 f"{', '.join(f'{r:.2f}' for r in p['round_ratios'])})."]
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = load_average()
    start = time.perf_counter()
    device = torch.device(args.device)
    batch_note = ("the real model at the protocol's batch size." if args.batch_size == PROTOCOL_BATCH else
                  f"the protocol's batch is {PROTOCOL_BATCH}; batch {args.batch_size} keeps a default run of the "
                  "four methods within minutes on a 2-core CPU.")
    description = describe(args, args.batch_size, args.device)
    print(f"torch threads: {threads} (default {threads_default}); load average {load_start}", flush=True)
    print(f"step time: {description} ({batch_note})", flush=True)

    setup = Setup(args, device, args.batch_size)
    steps, runners = time_methods(setup, args, threads)
    steps["description"] = description
    breakdown = None
    if args.breakdown_rounds and "mgda_ub" in runners:
        print("MGDA-UB breakdown", flush=True)
        breakdown = mgda_ub_breakdown(runners["mgda_ub"], args.breakdown_rounds, threads)
    del runners, setup
    gc.collect()

    memory = {}
    if args.memory_methods:
        print("peak memory of one step, one subprocess per method", flush=True)
        memory = measure_memory(args)

    print("fp32 vs bf16 images/s through accelerate", flush=True)
    precision = time_precision(args, threads)
    if "skipped" in precision:
        print(f"  skipped: {precision['skipped']}", flush=True)
    load_end = load_average()

    noisy_reasons = noisy_entries(steps, precision)
    targets = build_targets(steps, precision)
    # Recorded relative to the repository, so the result names no machine path.
    command = shlex.join(["python", "benchmarks/bench_dense.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "benchmark": "dense",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"encoder": args.encoder, "pretrained": False, "output_stride": args.output_stride,
                   "decoder": DECODER, "decoder_channels": args.decoder_channels, "tasks": OUT_CHANNELS,
                   "input": [3, args.height, args.width], "batch_size": args.batch_size,
                   "protocol_batch_size": PROTOCOL_BATCH, "batch_note": batch_note, "device": args.device,
                   "methods": args.methods, "warmup_steps": args.warmup_steps, "rounds": args.rounds,
                   "steps_per_round": args.steps_per_round, "breakdown_rounds": args.breakdown_rounds,
                   "memory_methods": args.memory_methods, "precision_batch_size": args.precision_batch_size,
                   "precision_warmup_steps": args.precision_warmup_steps,
                   "precision_rounds": args.precision_rounds, "precision_steps": args.precision_steps,
                   "precision_on_cpu": args.precision_on_cpu, "threads": args.threads, "seed": args.seed,
                   "optimizer": f"Adam lr {LR}, weight decay {WEIGHT_DECAY}",
                   "data": "random: image N(0,1) float32; segmentation int64 in -1..12; depth float32 in 0.5..10 "
                           f"with {DEPTH_ZERO_FRACTION:.0%} zeros; normal float32 unit vectors; "
                           f"{BATCHES} batches cycled"},
        "timed": TIMED_STEP,
        "machine": machine_info(threads_default, threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": bool(noisy_reasons),
        "noisy_reasons": noisy_reasons,
        "step_time": steps,
        "mgda_ub_breakdown": breakdown,
        "memory": memory,
        "precision": precision,
        "targets": targets,
        "wall_s": time.perf_counter() - start,
    }
    out = save_results(args.out_dir, "dense", result, write_markdown)

    print()
    print(f"timed step: {TIMED_STEP}")
    print(f"{description}")
    print(f"{'method':<12} {'median s':>9} {'min':>7} {'max':>7} {'img/s':>7} {'ratio':>7} {'med rnd':>8}")
    for name, f in steps["methods"].items():
        print(f"{name:<12} {f['median_s']:>9.2f} {f['min_s']:>7.2f} {f['max_s']:>7.2f} {f['images_per_s']:>7.2f} "
              f"{f['ratio_of_medians']:>7.3f} {f['median_round_ratio']:>8.3f}")
    if breakdown:
        print("MGDA-UB breakdown (median s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdown["median_s"].items())
              + f"; batched / loop {breakdown['batched_over_loop']:.2f}")
    if memory:
        eq = memory.get("equal", {}).get("first_step", {}).get("peak_increase_mib")
        for name, v in memory.items():
            if "error" not in v:
                x = v["first_step"]["peak_increase_mib"]
                rel = f" ({x / eq:.2f}x equal)" if eq else ""
                second = v.get("second_step", {})
                steady = (f", second step +{second['peak_increase_mib']:.0f} MiB"
                          if "peak_increase_mib" in second else "")
                print(f"memory {name}: first step +{x:.0f} MiB over the post-build baseline{rel}{steady}")
    if "skipped" in precision:
        print(f"fp32 vs bf16 (accelerate): skipped, {precision['skipped']}")
    else:
        print(f"fp32 vs bf16 (accelerate, {precision['device']}, batch {precision['batch_size']}): "
              f"fp32 {precision['median_images_per_s']['fp32']:.1f} images/s, "
              f"bf16 {precision['median_images_per_s']['bf16']:.1f} images/s")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    if noisy_reasons:
        print(f"NOISY: {'; '.join(noisy_reasons)} (max / min within this run). The machine was busy; rerun when "
              "it is quiet or with more --rounds.")
    print(f"results: {out / 'dense.json'}, {out / 'dense.md'} ({result['wall_s']:.0f}s)")
    for t in targets:
        print(f"{t['verdict']}: {t['target']} = {t['value']:.3f} (target {t['limit']})")
    if "skipped" in precision:
        print(f"SKIPPED: bf16 images/s / fp32 images/s (target >= {BF16_TARGET:.2f}): {precision['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
