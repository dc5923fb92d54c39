"""Command-line pieces every training script shares: options, their checks, the config they make.

Scripts build their own parser and add these groups, so each benchmark's script
keeps only what is particular to it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import NONFINITE_POLICIES, OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainerConfig
from .errors import ConfigError, MultisupError
from .weighting import WEIGHTINGS
from .weighting.min_norm import NORMALIZATIONS


def add_weighting_arguments(p: argparse.ArgumentParser, example_weights: str) -> None:
    g = p.add_argument_group("loss weighting")
    g.add_argument("--weighting", default="equal", choices=sorted(WEIGHTINGS), help="loss-balancing method (default: equal)")
    g.add_argument("--static-weights", default=None, metavar="TASK=W,...",
                   help=f"weights for --weighting static, e.g. {example_weights}")
    g.add_argument("--normalization", default="loss+", choices=NORMALIZATIONS,
                   help="gradient normalisation inside the MGDA solver (default: loss+, as Sener & Koltun)")
    g.add_argument("--gradnorm-alpha", type=float, default=1.5, help="GradNorm asymmetry alpha (default: 1.5)")
    g.add_argument("--gradnorm-lr", type=float, default=0.025, help="learning rate of GradNorm's weights")


def add_optimisation_arguments(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                               optimizer: str = "adam", weight_decay: float = 0.0, scheduler: str = "none",
                               step_size: int = 30, gamma: float = 0.1) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help=f"(default: {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"per process (default: {batch_size})")
    g.add_argument("--optimizer", default=optimizer, choices=OPTIMIZERS, help=f"(default: {optimizer})")
    g.add_argument("--lr", type=float, default=lr, help=f"(default: {lr})")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=f"(default: {weight_decay})")
    g.add_argument("--scheduler", default=scheduler, choices=SCHEDULERS, help=f"per-epoch LR schedule (default: {scheduler})")
    g.add_argument("--step-size", type=int, default=step_size, help=f"epochs between decays for --scheduler step (default: {step_size})")
    g.add_argument("--gamma", type=float, default=gamma, help=f"decay factor for --scheduler step (default: {gamma})")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--mixed-precision", default="no", choices=PRECISIONS)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="use only deterministic torch kernels")
    g.add_argument("--on-nonfinite", default="error", choices=NONFINITE_POLICIES,
                   help="on a NaN/inf loss: stop with an error (default) or skip the step and count it")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--num-workers", type=int, default=0, help="data loading worker processes (default: 0)")


def add_output_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out already holds a run")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch end)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")


def check_common(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
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


def weighting_options(args: argparse.Namespace, name: str) -> dict:
    """The keyword options of weighting ``name`` from the command line."""
    if args.static_weights and args.weighting != "static":
        raise ConfigError("--static-weights only applies to --weighting static")
    if name == "static":
        return {"weights": parse_static_weights(args.static_weights)}
    if name in ("mgda", "mgda_ub"):
        return {"normalization": args.normalization}
    if name == "gradnorm":
        return {"alpha": args.gradnorm_alpha, "lr": args.gradnorm_lr}
    return {}


def trainer_config(args: argparse.Namespace, seed: int | None = None) -> TrainerConfig:
    return TrainerConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, scheduler=args.scheduler, step_size=args.step_size, gamma=args.gamma,
        grad_clip=args.grad_clip, mixed_precision=args.mixed_precision, seed=args.seed if seed is None else seed,
        deterministic=args.deterministic, checkpoint_every=args.checkpoint_every, on_nonfinite=args.on_nonfinite,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard, cpu=args.cpu,
        num_workers=args.num_workers,
    )


def exit_on_user_error(run: Callable[[], int]) -> int:
    """Run a script body; a user mistake becomes one `error:` line and exit status 2."""
    try:
        return run()
    except MultisupError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


def write_results(out, table: str, results: dict, metrics: dict | None = None) -> None:
    """A run's outputs for people and programs: results.md (the table), results.json, metrics.json.

    ``metrics`` ({task: {metric: value}}) is written alone so that a single-task run's file
    can serve as another run's delta_m baseline. Prints the table.
    """
    from pathlib import Path

    from .io import atomic_write, write_json

    out = Path(out)
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    write_json(out / "results.json", results)
    atomic_write(out / "results.md", lambda f: f.write(table + "\n"), mode="w")
    sys.stdout.write(table + "\n")
