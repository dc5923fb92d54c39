#!/usr/bin/env python
"""Train a shared-encoder, two-head network on MultiMNIST (Sener & Koltun, NeurIPS 2018).

Runs on the embedded 5,000-image MNIST by default (no download), or on the real MNIST
with --data-root. Writes a run folder: config.json, history.json, checkpoints/last.pt,
tensorboard/ events, accuracy.png (per-task accuracy and task weights over epochs),
results.json and results.md (the table printed at the end).

Examples:
  python scripts/train_multimnist.py --out runs/equal
  python scripts/train_multimnist.py --weighting uncertainty --single-task-baselines
  python scripts/train_multimnist.py --weighting static --static-weights left=1,right=0.5
  python scripts/train_multimnist.py --out runs/equal --resume        # continue a killed run
  accelerate launch scripts/train_multimnist.py --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

import torch  # noqa: E402

from mtl.config import NONFINITE_POLICIES, OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainerConfig  # noqa: E402
from mtl.data.multimnist import TASKS, MultiMNIST  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.errors import ConfigError, MultisupError  # noqa: E402
from mtl.heads import ClassificationHead  # noqa: E402
from mtl.io import atomic_write, write_json  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.plotting import plot_history  # noqa: E402
from mtl.tasks import classification_task  # noqa: E402
from mtl.trainer import Trainer  # noqa: E402
from mtl.weighting import WEIGHTINGS, build_weighting  # noqa: E402

PUBLISHED = "Sener & Koltun 2018 (60k pairs, full MNIST): single task 97.23 / 95.90, uniform 96.46 / 94.99"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--weighting", default="equal", choices=sorted(WEIGHTINGS), help="loss-balancing method (default: equal)")
    g.add_argument("--static-weights", default=None, metavar="TASK=W,...",
                   help="weights for --weighting static, e.g. left=1.0,right=0.5")
    g.add_argument("--encoder", default="multilenet", help="shared encoder name (default: multilenet)")
    g.add_argument("--single-task-baselines", action="store_true",
                   help="also train one single-task model per task and put them in the table")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, help="folder with torchvision's MNIST layout (MNIST/raw/*-ubyte); "
                   "default: the embedded 5,000-image MNIST")
    g.add_argument("--train-pairs", type=int, default=10000, help="training pairs drawn from the train digits (default: 10000)")
    g.add_argument("--test-pairs", type=int, default=2000, help="test pairs drawn from the test digits (default: 2000)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="none", choices=SCHEDULERS, help="per-epoch LR schedule")
    g.add_argument("--step-size", type=int, default=30, help="epochs between decays for --scheduler step")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor for --scheduler step")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--mixed-precision", default="no", choices=PRECISIONS)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="use only deterministic torch kernels")
    g.add_argument("--on-nonfinite", default="error", choices=NONFINITE_POLICIES,
                   help="on a NaN/inf loss: stop with an error (default) or skip the step and count it")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/multimnist", help="run folder (default: runs/multimnist)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out already holds a run")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch end)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other; pick one")
    return args


def parse_static_weights(text: str | None) -> dict[str, float]:
    if not text:
        raise ConfigError("--weighting static needs --static-weights, e.g. --static-weights left=1.0,right=0.5")
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"cannot read static weight '{item}'; write TASK=NUMBER, e.g. left=1.0,right=0.5")
    return weights


def build_model(encoder: str, tasks: list[str]) -> MultiTaskModel:
    enc = build_encoder(encoder, in_channels=1)
    # One MultiLeNet task branch per task: 50 -> 50 -> ReLU -> dropout -> 10 (Sener & Koltun).
    return MultiTaskModel(enc, {t: ClassificationHead(enc.out_features, 10, hidden=50, dropout=0.5) for t in tasks})


def trainer_config(args) -> TrainerConfig:
    return TrainerConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, scheduler=args.scheduler, step_size=args.step_size, gamma=args.gamma,
        grad_clip=args.grad_clip, mixed_precision=args.mixed_precision, seed=args.seed,
        deterministic=args.deterministic, checkpoint_every=args.checkpoint_every, on_nonfinite=args.on_nonfinite,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard, cpu=args.cpu,
    )


def train_one(args, tasks: list[str], weighting_name: str, weighting_options: dict, run_dir: Path,
              data, resume: bool) -> tuple[Trainer, dict]:
    torch.manual_seed(args.seed)  # the model's initial weights depend on the seed only
    model = build_model(args.encoder, tasks)
    task_objs = [classification_task(t, 10) for t in tasks]
    weighting = build_weighting(weighting_name, task_objs, **weighting_options)
    run_config = {"encoder": args.encoder, "tasks": tasks, "weighting": weighting_name,
                  "weighting_options": weighting_options, "train_pairs": args.train_pairs,
                  "test_pairs": args.test_pairs, "data_root": args.data_root}
    trainer = Trainer(model, task_objs, weighting, data[0], data[1], trainer_config(args), run_dir,
                      run_config=run_config, overwrite=args.overwrite)
    history = trainer.fit(resume=run_dir if resume else None)
    if trainer.accelerator.is_main_process:
        plot_history(history, run_dir / "accuracy.png", title=f"MultiMNIST, {weighting_name} weighting, tasks {tasks}")
    return trainer, history


def final_accuracy(history: dict, task: str) -> float:
    return 100 * history["epochs"][-1]["eval"][task]["accuracy"]


def results_table(args, rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [
        f"MultiMNIST test accuracy (%): {args.train_pairs} training / {args.test_pairs} test pairs, "
        f"{args.epochs} epochs, {args.encoder}, seed {args.seed}, "
        + ("embedded MNIST" if args.data_root is None else f"MNIST from {args.data_root}"),
        "",
        "| model | " + " | ".join(TASKS) + " |",
        "|---|" + "---:|" * len(TASKS),
    ]
    for name, acc in rows:
        lines.append(f"| {name} | " + " | ".join(f"{acc[t]:.2f}" if t in acc else "-" for t in TASKS) + " |")
    lines += ["", f"Published, for scale: {PUBLISHED}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        weighting_options = {}
        if args.weighting == "static":
            weighting_options["weights"] = parse_static_weights(args.static_weights)
        elif args.static_weights:
            raise ConfigError("--static-weights only applies to --weighting static")
        if args.train_pairs <= 0 or args.test_pairs <= 0:
            raise ConfigError("--train-pairs and --test-pairs must be positive")
        build_encoder(args.encoder, in_channels=1)  # fail on a bad name before any data work
        data = (MultiMNIST("train", args.train_pairs, args.seed, args.data_root),
                MultiMNIST("test", args.test_pairs, args.seed, args.data_root))
        out = Path(args.out)
        trainer, history = train_one(args, list(TASKS), args.weighting, weighting_options, out, data, args.resume)
        rows = [(f"multi-task ({args.weighting})", {t: final_accuracy(history, t) for t in TASKS})]
        if args.single_task_baselines:
            single = {}
            for task in TASKS:
                run_dir = out / "baselines" / task
                resume = args.resume and (run_dir / "checkpoints" / "last.pt").exists()
                _, h = train_one(args, [task], "equal", {}, run_dir, data, resume)
                single[task] = final_accuracy(h, task)
            rows.append(("single-task baselines", single))
    except MultisupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        table = results_table(args, rows)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_json(out / "results.json", {"rows": [{"model": n, "accuracy": a} for n, a in rows],
                                          "peak_rss_mib": round(peak_mib, 1), "args": vars(args)})
        atomic_write(out / "results.md", lambda f: f.write(table + "\n"), mode="w")
        print(table)
        print(f"\nrun folder: {out}  (plot: {out / 'accuracy.png'}; peak resident memory {peak_mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
