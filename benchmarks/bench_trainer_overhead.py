"""How much slower is a Trainer training epoch than a bare PyTorch loop doing the same work?

Both sides train the same MultiTaskModel (MultiLeNet encoder + two
``ClassificationHead(50, 10, hidden=50, dropout=0.5)`` heads, "left" and "right")
on the same MultiMNIST training pairs, with Adam (lr 1e-3), the same batch size,
shuffling every epoch, equal task weights, on the CPU, in one process with one
``torch.set_num_threads`` setting.

What is timed (wall clock, ``time.perf_counter``):

- bare: one pass over ``torch.utils.data.DataLoader(dataset, batch_size, shuffle=True)``
  (iterator creation included); per batch: forward, ``F.cross_entropy`` per task,
  ``.item()`` of each task loss (summed for the epoch mean, as a logging loop does),
  the sum of the two losses, ``backward``, ``Adam.step``, ``zero_grad``.
- trainer: one call to ``Trainer._train_epoch()``: the Accelerate-prepared loader
  over the same data set with the Trainer's ``EpochShuffleSampler``, and per batch
  ``Trainer.train_step`` (label-range checks, loss stacking and ``.tolist()``,
  finiteness checks, ``EqualWeighting.backward`` through ``accelerator.backward``,
  the wrapped optimizer's step and zero_grad) and ``_record_step``; the progress
  bar is disabled. Not timed: ``_end_epoch`` (scheduler, evaluation, history,
  checkpoint writing) and building the Trainer. Between timed epochs, outside the
  timing, ``progress.epoch`` is incremented, ``progress.batch`` reset to 0 and the
  epoch's loss sums cleared, which is the part of ``_end_epoch`` the next epoch needs.

One warm-up epoch per side, then ``--repeats`` rounds of (bare epoch, trainer
epoch), alternating, so that both sides see the same machine load. The result is
the ratio of the median epoch times (trainer / bare); the target is <= 1.05.
Only ratios measured in the same run are meaningful on a noisy machine.

Results go to ``benchmarks/results/trainer_overhead.json`` and ``.md`` (atomic
writes). The exit status is 0 whether or not the target is met.

  python benchmarks/bench_trainer_overhead.py
  python benchmarks/bench_trainer_overhead.py --pairs 20000 --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import load_average, machine_info as common_machine_info, save_results  # noqa: E402
from mtl.config import TrainerConfig  # noqa: E402
from mtl.data import MultiMNIST  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.heads import ClassificationHead  # noqa: E402
from mtl.io import atomic_write  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import classification_task  # noqa: E402
from mtl.trainer import Trainer  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402

TASKS = ("left", "right")
TARGET_RATIO = 1.05
NOISY_SPREAD = 1.5  # max / min epoch time of one side above which the run is flagged as noisy
LR = 1e-3
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

TIMED_BARE = (
    "one pass over torch DataLoader(dataset, batch_size, shuffle=True, num_workers=0), iterator creation "
    "included; per batch: model forward, F.cross_entropy per task, .item() of each task loss (summed for "
    "the epoch mean), sum of the losses, backward, Adam.step, zero_grad(set_to_none=True)"
)
TIMED_TRAINER = (
    "one call to Trainer._train_epoch(): the Accelerate-prepared DataLoader with EpochShuffleSampler, "
    "per batch Trainer.train_step (label-range checks, loss stack + .tolist(), finiteness checks, "
    "EqualWeighting.backward via accelerator.backward, wrapped optimizer step + zero_grad) and "
    "_record_step; progress bar disabled. Not timed: _end_epoch (scheduler, evaluation, history, "
    "checkpoint writing) and Trainer construction"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time Trainer training epochs against a bare PyTorch loop (MultiMNIST, equal weighting, "
                    "CPU), alternating in one run, and report the ratio trainer / bare "
                    f"(target <= {TARGET_RATIO}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pairs", type=int, default=10000, help="MultiMNIST training pairs (the data set size)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of both loops")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds; each round is one bare epoch then one trainer epoch")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides (None: leave torch's default; the count used is recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and of the model initialisation")
    p.add_argument("--data-root", default=None,
                   help="torchvision MNIST folder (None: the embedded 5,000-image MNIST)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help="folder for trainer_overhead.json and trainer_overhead.md")
    args = p.parse_args(argv)
    for name in ("pairs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size > args.pairs:
        p.error(f"--batch-size {args.batch_size} is larger than --pairs {args.pairs}")
    return args


def build_model(seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)  # both sides start from the same weights
    enc = build_encoder("multilenet", in_channels=1)
    heads = {t: ClassificationHead(enc.out_features, 10, hidden=50, dropout=0.5) for t in TASKS}
    return MultiTaskModel(enc, heads)


class BareLoop:
    """The hand-written loop: what the Trainer's epoch does, without the Trainer."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.model = build_model(seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
        self.mean_loss: dict[str, float] = {}

    def epoch(self) -> None:
        model, opt = self.model, self.optimizer
        model.train()
        sums, count = dict.fromkeys(TASKS, 0.0), 0
        for inputs, targets in self.loader:
            outputs = model(inputs)
            losses = {t: F.cross_entropy(outputs[t], targets[t]) for t in TASKS}
            for t in TASKS:
                sums[t] += losses[t].item()
            count += 1
            total = losses["left"] + losses["right"]
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.mean_loss = {t: s / count for t, s in sums.items()}


class TrainerEpochs:
    """A Trainer whose training epochs are run one at a time, without _end_epoch."""

    def __init__(self, dataset, batch_size: int, seed: int, run_dir: Path, epochs: int):
        tasks = [classification_task(t, 10) for t in TASKS]
        config = TrainerConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=LR, seed=seed,
                               progress=False, tensorboard=False, cpu=True, checkpoint_every=0)
        self.trainer = Trainer(build_model(seed), tasks, build_weighting("equal", tasks), dataset, None,
                               config, run_dir)
        self.mean_loss: dict[str, float] = {}

    def epoch(self) -> None:
        self.trainer._train_epoch()
        sums = self.trainer._epoch_sums
        self.mean_loss = {t: v / max(sums["count"], 1) for t, v in sums["loss"].items()}

    def next_epoch(self) -> None:
        """The bookkeeping of _end_epoch that the next _train_epoch relies on (untimed)."""
        tr = self.trainer
        tr.progress.epoch += 1
        tr.progress.batch = 0
        tr._epoch_sums = tr._zero_sums()


def timed(fn, threads: int) -> float:
    if torch.get_num_threads() != threads:  # something changed the setting: put it back, both sides equal
        torch.set_num_threads(threads)
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info(threads_default: int, threads_used: int) -> dict:
    import accelerate

    return common_machine_info(accelerate=accelerate.__version__, torch_threads_default=threads_default,
                               torch_threads=threads_used)


def write_markdown(path: Path, result: dict) -> None:
    f, cfg, m = result["figures"], result["config"], result["machine"]
    rows = [
        "# Trainer overhead: training-epoch time, Trainer vs bare PyTorch loop",
        "",
        f"MultiMNIST train split, {cfg['pairs']} pairs, batch {cfg['batch_size']} "
        f"({cfg['batches_per_epoch']} batches/epoch), MultiLeNet + 2 heads, Adam lr {LR}, equal weighting, "
        f"CPU, {m['torch_threads']} torch threads; {cfg['repeats']} alternating rounds after 1 warm-up "
        f"epoch per side. {result['date']}, {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"accelerate {m['accelerate']}.",
        "",
        "| side | median epoch (s) | min (s) | max (s) | median ms/batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in ("bare", "trainer"):
        s = f[side]
        rows.append(f"| {side} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['max_s']:.3f} | "
                    f"{s['median_ms_per_batch']:.2f} |")
    rows += [
        "",
        f"**Ratio of medians (trainer / bare): {f['ratio_of_medians']:.3f}** "
        f"(target <= {TARGET_RATIO}: {result['verdict']}).",
        "",
        "Per-round ratios: " + ", ".join(f"{r:.3f}" for r in f["round_ratios"])
        + f" (median {f['median_round_ratio']:.3f}); ratio of minimum epoch times {f['ratio_of_minimums']:.3f}.",
        "",
        f"Load average (1, 5, 15 min): start {result['load_average_1_5_15min']['start']}, "
        f"end {result['load_average_1_5_15min']['end']}."
        + (" **Noisy run**: epoch times of one side varied by more than "
           f"{NOISY_SPREAD}x (max / min); treat the ratio with caution." if result["noisy"] else ""),
        "",
        f"Timed, bare: {result['timed']['bare']}.",
        "",
        f"Timed, trainer: {result['timed']['trainer']}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    atomic_write(path, lambda fh: fh.write("\n".join(rows)), mode="w")


def side_stats(times: list[float], batches: int) -> dict:
    med = statistics.median(times)
    return {"epochs_s": times, "median_s": med, "min_s": min(times), "max_s": max(times),
            "spread_max_over_min": max(times) / min(times), "median_ms_per_batch": 1000 * med / batches}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("mtl").setLevel(logging.WARNING)
    threads_default = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    load_start = load_average()
    t0 = time.perf_counter()
    dataset = MultiMNIST("train", size=args.pairs, seed=args.seed, root=args.data_root)
    print(f"data: {len(dataset)} MultiMNIST training pairs built in {time.perf_counter() - t0:.1f}s; "
          f"torch threads: {threads} (default {threads_default})", flush=True)

    rounds = args.repeats
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as run_dir:
        bare = BareLoop(dataset, args.batch_size, args.seed)
        trainer = TrainerEpochs(dataset, args.batch_size, args.seed, Path(run_dir), epochs=rounds + 1)
        if torch.get_num_threads() != threads:
            print(f"note: building the Trainer changed torch threads to {torch.get_num_threads()}; "
                  f"reset to {threads} for both sides", flush=True)
            torch.set_num_threads(threads)
        batches = len(bare.loader)
        assert batches == len(trainer.trainer.train_loader), "the two loaders disagree on batches per epoch"

        warm_bare = timed(bare.epoch, threads)
        warm_trainer = timed(trainer.epoch, threads)
        trainer.next_epoch()
        print(f"warm-up: bare {warm_bare:.3f}s, trainer {warm_trainer:.3f}s "
              f"({batches} batches of {args.batch_size})", flush=True)

        bare_times, trainer_times = [], []
        for r in range(rounds):
            bare_times.append(timed(bare.epoch, threads))
            trainer_times.append(timed(trainer.epoch, threads))
            trainer.next_epoch()
            print(f"round {r + 1}/{rounds}: bare {bare_times[-1]:.3f}s, trainer {trainer_times[-1]:.3f}s, "
                  f"ratio {trainer_times[-1] / bare_times[-1]:.3f}", flush=True)
        loss_bare, loss_trainer = bare.mean_loss, trainer.mean_loss
        steps = trainer.trainer.progress.step
        skipped = trainer.trainer.history["skipped_steps"]

    load_end = load_average()
    round_ratios = [t / b for b, t in zip(bare_times, trainer_times)]
    figures = {
        "bare": side_stats(bare_times, batches),
        "trainer": side_stats(trainer_times, batches),
        "warmup_s": {"bare": warm_bare, "trainer": warm_trainer},
        "round_ratios": round_ratios,
        "median_round_ratio": statistics.median(round_ratios),
    }
    ratio = figures["trainer"]["median_s"] / figures["bare"]["median_s"]
    figures["ratio_of_medians"] = ratio
    figures["ratio_of_minimums"] = figures["trainer"]["min_s"] / figures["bare"]["min_s"]
    spread = max(figures["bare"]["spread_max_over_min"], figures["trainer"]["spread_max_over_min"])
    noisy = spread > NOISY_SPREAD
    figures["overhead_ms_per_batch"] = (figures["trainer"]["median_ms_per_batch"]
                                        - figures["bare"]["median_ms_per_batch"])
    figures["last_epoch_mean_loss"] = {"bare": loss_bare, "trainer": loss_trainer}
    figures["trainer_steps"] = steps
    figures["trainer_skipped_steps"] = skipped
    verdict = "PASS" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    # Recorded relative to the repository, so the result names no machine path.
    command = shlex.join(["python", "benchmarks/bench_trainer_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "benchmark": "trainer_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"pairs": args.pairs, "batch_size": args.batch_size, "repeats": rounds, "seed": args.seed,
                   "threads": args.threads, "data_root": args.data_root, "batches_per_epoch": batches,
                   "model": "multilenet + ClassificationHead(50, 10, hidden=50, dropout=0.5) x {left, right}",
                   "optimizer": f"Adam lr {LR}", "weighting": "equal", "device": "cpu",
                   "schedule": "1 warm-up epoch per side, then rounds of (bare epoch, trainer epoch)"},
        "timed": {"bare": TIMED_BARE, "trainer": TIMED_TRAINER},
        "machine": machine_info(threads_default, threads),
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "noisy": noisy,
        "figures": figures,
        "target_ratio": TARGET_RATIO,
        "verdict": verdict,
    }

    out = save_results(args.out_dir, "trainer_overhead", result, write_markdown)

    b, t = figures["bare"], figures["trainer"]
    print()
    print(f"timed, bare:    {TIMED_BARE}")
    print(f"timed, trainer: {TIMED_TRAINER}")
    print()
    print(f"{'side':<8} {'median s':>9} {'min s':>8} {'max s':>8} {'ms/batch':>9}")
    for name, s in (("bare", b), ("trainer", t)):
        print(f"{name:<8} {s['median_s']:>9.3f} {s['min_s']:>8.3f} {s['max_s']:>8.3f} "
              f"{s['median_ms_per_batch']:>9.2f}")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in round_ratios)} "
          f"(median {figures['median_round_ratio']:.3f})")
    print(f"ratio of minimum epoch times: {figures['ratio_of_minimums']:.3f}")
    print(f"overhead: {figures['overhead_ms_per_batch']:+.2f} ms/batch (difference of the medians)")
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    if noisy:
        print(f"NOISY: epoch times of one side vary up to {spread:.2f}x (max / min) within this run, so the machine "
              "was busy; the ratio is unreliable. Rerun when the machine is quiet, with more --repeats, or with "
              "--threads 1 (oversubscribed torch threads make busy-machine timings far noisier).")
    print(f"mean loss of the last epoch: bare {loss_bare}, trainer {loss_trainer}")
    print(f"results: {out / 'trainer_overhead.json'}, {out / 'trainer_overhead.md'}")
    print(f"{verdict}: trainer / bare = {ratio:.3f} (ratio of median epoch times; target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
