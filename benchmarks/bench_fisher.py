"""How much faster is EWC's per-sample Fisher with torch.func than one backward per sample, and do they agree?

Both sides compute the diagonal empirical Fisher (``continual.fisher.empirical_fisher``:
the mean over samples of squared per-sample gradients of log p(y | x), true labels, model
in eval mode) of the same model on the same batch:

- ``vmap``: ``per_sample="vmap"``, all per-sample gradients of the batch at once with
  ``torch.func`` (``functional_call`` + ``grad`` + ``vmap``);
- ``loop``: ``per_sample="loop"``, one forward and one ``torch.autograd.grad`` per sample
  through the real module (the reference).

Model: ``build_encoder("multilenet", in_channels=1)`` (Sener & Koltun's MultiLeNet trunk, 50
features) and a linear head to 10 classes, random weights (seed ``--seed``). Data:
``--samples`` images of the embedded MNIST training split (``mtl.data.mnist.load_mnist``),
drawn at random with the seed, scaled to [0, 1], with their true labels; log-likelihood =
minus the cross-entropy.

Timing (wall clock, ``time.perf_counter``, one call = the whole Fisher of the batch): one
warm-up call per side (the first torch.func call pays a one-off set-up), then ``--rounds``
rounds of one call per side, the order alternating from round to round so both sides see
the same machine load, in one process with ``--threads`` torch threads (1 by default: on a
shared machine several threads per process make times swing). Reported: the speed-up
median(loop) / median(vmap), per-round ratios, and the largest absolute difference between
the two Fishers and that difference relative to the largest Fisher entry. Also reported,
for information: how far the square of the batch-mean gradient (the trap) is from the Fisher.

Targets: speed-up >= 5 and both differences <= 1e-6. Only ratios measured in the same run
are meaningful on a noisy machine; absolute times count only on a GPU (``--device cuda``).

Results go to ``benchmarks/results/fisher.json`` and ``.md`` (atomic writes). The exit
status is 0 whether or not the targets are met.

  python benchmarks/bench_fisher.py
  python benchmarks/bench_fisher.py --samples 512 --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from common import ensure_threads, load_average, machine_info, save_results, sync  # noqa: E402
from continual.fisher import empirical_fisher  # noqa: E402
from mtl.data.mnist import load_mnist  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.io import atomic_write  # noqa: E402

TARGET_SPEEDUP = 5.0
TARGET_DIFF = 1e-6
NOISY_SPREAD = 1.5
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SIDES = ("vmap", "loop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the per-sample empirical Fisher (EWC) with torch.func against one backward per "
                    "sample, on the same model and batch, alternating in one run; check they agree.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Targets: speed-up loop / vmap >= {TARGET_SPEEDUP:g}; max abs and relative difference "
               f"<= {TARGET_DIFF:g}.")
    p.add_argument("--samples", type=int, default=256, help="MNIST training images in the batch")
    p.add_argument("--rounds", type=int, default=31, help="timed rounds, one call per side each")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and the image draw")
    p.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--data-root", default=None, help="torchvision MNIST folder (default: the embedded MNIST)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder for fisher.json and fisher.md")
    args = p.parse_args(argv)
    for name in ("samples", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device; use cpu or cuda")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no GPU; use --device cpu")
    return args


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    encoder = build_encoder("multilenet", in_channels=1)
    return nn.Sequential(encoder, nn.Linear(encoder.out_features, 10))


def load_batch(samples: int, seed: int, root) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("train", root=root)
    if samples > len(images):
        raise SystemExit(f"--samples {samples} is more than the {len(images)} training images; lower it")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:samples]
    return images[idx].unsqueeze(1).float() / 255.0, labels[idx]


def log_likelihood(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(out, y, reduction="none")


def timed(fn, threads: int, device: torch.device) -> tuple[float, dict]:
    ensure_threads(threads)
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def differences(fast: dict, slow: dict) -> dict:
    biggest = max(float(f.abs().max()) for f in slow.values())
    worst = max(float((fast[n].double() - slow[n].double()).abs().max()) for n in slow)
    elementwise = max(float(((fast[n].double() - slow[n].double()).abs()
                             / slow[n].double().abs().clamp_min(1e-12 * biggest)).max()) for n in slow)
    return {"max_abs_diff": worst, "max_rel_diff": worst / biggest, "max_fisher": biggest,
            "max_elementwise_rel_diff": elementwise}


def trap_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: dict) -> dict:
    """The square of the batch-mean gradient (the EWC trap) against the per-sample Fisher."""
    model.eval()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(log_likelihood(model(x), y).mean(), list(params.values()))
    trap = sum(float(g.double().pow(2).sum()) for g in grads)
    total = sum(float(f.double().sum()) for f in fisher.values())
    return {"sum_fisher": total, "sum_square_of_mean_gradient": trap, "ratio": total / trap}


def write_markdown(path: Path, result: dict) -> None:
    f, cfg, m, d = result["figures"], result["config"], result["machine"], result["figures"]["differences"]
    rows = [
        "# EWC Fisher: per-sample gradients with torch.func vs one backward per sample",
        "",
        f"Diagonal empirical Fisher (true labels, eval mode) of MultiLeNet + linear head "
        f"({cfg['parameters']:,} parameters) on {cfg['samples']} embedded MNIST training images scaled to [0, 1], "
        f"device {cfg['device']}, {m['torch_threads']} torch thread(s); {cfg['rounds']} alternating rounds after one "
        f"warm-up call per side. {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if cfg["device"].startswith("cuda") else "") + ".",
        "",
        "| side | median (s) | min (s) | max (s) | median ms/sample |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        s = f[side]
        rows.append(f"| {side} | {s['median_s']:.4f} | {s['min_s']:.4f} | {s['max_s']:.4f} | "
                    f"{s['median_ms_per_sample']:.3f} |")
    rows += [
        "",
        f"**Speed-up, median(loop) / median(vmap): {f['speedup']:.1f}x** (target >= {TARGET_SPEEDUP:g}: "
        f"{result['speed_verdict']}). Per-round ratios: " + ", ".join(f"{r:.1f}" for r in f["round_ratios"]) + ".",
        "",
        f"**Agreement**: max |F_vmap - F_loop| = {d['max_abs_diff']:.2e}, relative to the largest entry "
        f"({d['max_fisher']:.3e}): {d['max_rel_diff']:.2e} (target <= {TARGET_DIFF:g} for both: "
        f"{result['agreement_verdict']}); largest entry-wise relative difference {d['max_elementwise_rel_diff']:.2e}.",
        "",
        f"The trap, for information: sum of the Fisher {f['trap']['sum_fisher']:.4g} vs sum of the squared batch-mean "
        f"gradient {f['trap']['sum_square_of_mean_gradient']:.4g} ({f['trap']['ratio']:.1f}x smaller).",
        "",
        f"Load average (1, 5, 15 min): start {result['load_average_1_5_15min']['start']}, end "
        f"{result['load_average_1_5_15min']['end']}."
        + (f" **Noisy run**: one side's times varied by more than {NOISY_SPREAD}x (max / min)." if result["noisy"]
           else ""),
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_default = torch.get_num_threads()
    ensure_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = load_average()
    t_start = time.perf_counter()
    x, y = load_batch(args.samples, args.seed, args.data_root)
    model = build_model(args.seed).to(args.device)
    x, y = x.to(args.device), y.to(args.device)
    calls = {side: (lambda side=side: empirical_fisher(model, (x, y), log_likelihood, per_sample=side))
             for side in SIDES}

    warmup = {side: timed(calls[side], threads, args.device)[0] for side in SIDES}
    print(f"{args.samples} samples, {sum(p.numel() for p in model.parameters()):,} parameters, {threads} "
          f"thread(s), {args.device}; warm-up: vmap {warmup['vmap']:.3f}s, loop {warmup['loop']:.3f}s", flush=True)
    times = {side: [] for side in SIDES}
    results = {}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            seconds, results[side] = timed(calls[side], threads, args.device)
            times[side].append(seconds)
        print(f"round {r + 1}/{args.rounds}: vmap {times['vmap'][-1]:.4f}s, loop {times['loop'][-1]:.4f}s, "
              f"speed-up {times['loop'][-1] / times['vmap'][-1]:.1f}x", flush=True)
    load_end = load_average()

    figures = {side: {"times_s": times[side], "median_s": statistics.median(times[side]), "min_s": min(times[side]),
                      "max_s": max(times[side]), "warmup_s": warmup[side],
                      "median_ms_per_sample": 1000 * statistics.median(times[side]) / args.samples}
               for side in SIDES}
    figures["speedup"] = figures["loop"]["median_s"] / figures["vmap"]["median_s"]
    figures["round_ratios"] = [lo / vm for lo, vm in zip(times["loop"], times["vmap"])]
    figures["differences"] = diffs = differences(results["vmap"], results["loop"])
    figures["trap"] = trap_gap(model, x, y, results["loop"])
    noisy = any(max(times[s]) / min(times[s]) > NOISY_SPREAD for s in SIDES)
    speed_ok = figures["speedup"] >= TARGET_SPEEDUP
    agree_ok = diffs["max_abs_diff"] <= TARGET_DIFF and diffs["max_rel_diff"] <= TARGET_DIFF
    command = shlex.join(["python", "benchmarks/bench_fisher.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "benchmark": "fisher",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"samples": args.samples, "rounds": args.rounds, "threads": args.threads, "seed": args.seed,
                   "device": str(args.device), "data_root": args.data_root,
                   "model": "build_encoder('multilenet', in_channels=1) + nn.Linear(50, 10), random weights",
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "log_likelihood": "-F.cross_entropy(logits, true label, reduction='none')",
                   "timed": "one empirical_fisher call over the whole batch (per_sample='vmap' or 'loop')",
                   "targets": {"speedup_at_least": TARGET_SPEEDUP, "max_diff": TARGET_DIFF}},
        "machine": machine_info(torch_threads_default=threads_default, torch_threads=threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": noisy,
        "figures": figures,
        "speed_verdict": "PASS" if speed_ok else "BELOW TARGET",
        "agreement_verdict": "PASS" if agree_ok else "ABOVE TARGET",
        "verdict": "PASS" if speed_ok and agree_ok else "MISSED TARGET",
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = save_results(args.out_dir, "fisher", result, write_markdown)
    print(f"speed-up median(loop) / median(vmap): {figures['speedup']:.2f}x (target >= {TARGET_SPEEDUP:g}) "
          f"{result['speed_verdict']}")
    print(f"max |F_vmap - F_loop| {diffs['max_abs_diff']:.2e}, relative to the largest entry "
          f"{diffs['max_rel_diff']:.2e} (target <= {TARGET_DIFF:g}) {result['agreement_verdict']}")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}; wall {result['wall_s']} s")
    print(f"results: {out / 'fisher.json'}, {out / 'fisher.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
