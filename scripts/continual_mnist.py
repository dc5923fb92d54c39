#!/usr/bin/env python
"""Continual learning on digit streams: train experience by experience, fill the accuracy matrix.

Streams (--scenario, --dataset): split (classes in pairs: 5 experiences), permuted (a fixed
pixel permutation per task) and rotated (a fixed angle per task), over the embedded MNIST
(4,000 / 1,000 images) or UCI digits (split only), or torchvision's MNIST / CIFAR-10 /
CIFAR-100 under --data-root. Settings (--setting): task (a head per task, task id given at
test), class (one growing head, no task id), domain (one shared head).

After every experience the whole run state is checkpointed; --resume continues a killed
run and ends with the accuracy matrix an uninterrupted run would have had. --compare runs
every strategy of --strategies for every seed of --seeds and writes one table (ACC, BWT,
forgetting, wall time) with a heat map of each strategy's accuracy matrix.

Examples:
  python scripts/continual_mnist.py --strategy er --scenario split --setting class
  python scripts/continual_mnist.py --compare --scenario split --setting class --out runs/split-class
  python scripts/continual_mnist.py --strategy ewc --scenario permuted --setting domain --strength 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from continual.learner import ContinualLearner  # noqa: E402
from continual.metrics import plot_accuracy_matrix  # noqa: E402
from continual.runner import StreamRunner  # noqa: E402
from continual.scenarios import SETTINGS, build_stream  # noqa: E402
from continual.strategies import STRATEGIES, build_strategy, strategy_options  # noqa: E402
from mtl.cli import (add_optimisation_arguments, add_output_arguments, check_common, mean_std_cell,  # noqa: E402
                     parse_seeds, script_main, trainer_config, write_results)
from mtl.encoders import build_encoder  # noqa: E402
from mtl.errors import ConfigError, NonFiniteLossError  # noqa: E402

SCENARIOS = ("split", "permuted", "rotated")
DATASETS = ("mnist", "uci_digits", "cifar10", "cifar100")
ENCODERS = ("mlp", "multilenet", "resnet18")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("stream")
    g.add_argument("--scenario", default="split", choices=SCENARIOS, help="how the stream is cut (default: split)")
    g.add_argument("--setting", default="class", choices=SETTINGS,
                   help="task, class or domain incremental (default: class)")
    g.add_argument("--dataset", default="mnist", choices=DATASETS,
                   help="mnist and uci_digits are embedded; cifar10 / cifar100 need --data-root (default: mnist)")
    g.add_argument("--data-root", default=None, help="folder with torchvision's MNIST / CIFAR layouts")
    g.add_argument("--encoder", default="mlp", choices=ENCODERS,
                   help="mlp: two 100-unit ReLU layers, as in the Split-MNIST literature (default: mlp)")
    g = p.add_argument_group("strategy")
    g.add_argument("--strategy", default="finetune", choices=list(STRATEGIES), help="(default: finetune)")
    g.add_argument("--buffer-size", type=int, default=None,
                   help="replay memory in samples (default: 200; iCaRL / LUCIR exemplars: 2000)")
    g.add_argument("--strength", type=float, default=None,
                   help="regularisation strength: EWC / online EWC lambda, L2, SI's c (default: 1)")
    g.add_argument("--gamma-ewc", dest="ewc_gamma", type=float, default=None,
                   help="online EWC's decay of the old Fisher (default: 1)")
    g.add_argument("--xi", type=float, default=None, help="SI's damping (default: 0.1)")
    g.add_argument("--alpha", type=float, default=None, help="LwF's distillation weight; DER's logit weight")
    g.add_argument("--beta", type=float, default=None,
                   help="DER++'s label weight on replayed samples; LwM's distillation weight")
    g.add_argument("--attention", type=float, default=None, help="LwM's attention-distillation weight (default: 1)")
    g.add_argument("--ewc-alpha", dest="ewc_alpha", type=float, default=None,
                   help="EWC++ / RWalk: weight of the newest batch in the Fisher's moving average (default: 0.9)")
    g.add_argument("--temperature", type=float, default=None, help="LwF's softmax temperature (default: 2)")
    g.add_argument("--margin", type=float, default=None,
                   help="GEM's margin on its constraints (default: 0); LUCIR's ranking margin (default: 0.5)")
    g.add_argument("--compare", action="store_true",
                   help="run every strategy of --strategies for every seed of --seeds and write one table")
    g.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="strategies for --compare (default: all)")
    g.add_argument("--seeds", default="0,1,2", help="seeds for --compare (default: 0,1,2)")
    add_optimisation_arguments(p, epochs=5, batch_size=10, lr=0.03, optimizer="sgd")
    add_output_arguments(p, "runs/continual")
    return check_common(p, p.parse_args(argv))


def command_line_options(args, name: str) -> dict:
    """The strategy options on the command line, under the names strategy ``name`` takes them."""
    moving_average = name in ("ewc_pp", "rwalk")  # their alpha is the Fisher's moving-average weight
    return {"buffer_size": args.buffer_size, "memory_size": args.buffer_size, "strength": args.strength,
            "gamma": args.ewc_gamma, "xi": args.xi, "alpha": args.ewc_alpha if moving_average else args.alpha,
            "beta": args.beta, "attention": args.attention, "temperature": args.temperature, "margin": args.margin}


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"unknown strategy(ies) {unknown or text!r} in --strategies; choose from: "
                          f"{', '.join(STRATEGIES)}")
    return names


def load_stream(args, seed: int):
    if args.scenario != "split" and args.dataset != "mnist":
        raise ConfigError(f"--scenario {args.scenario} is built for MNIST; use --dataset mnist (or --scenario split).")
    return build_stream(f"{args.scenario}_{args.dataset}", args.setting, seed=seed, root=args.data_root)


def options_for(name: str, args, seed: int) -> dict:
    """The command line's strategy options that ``name`` takes (the others are for other strategies)."""
    taken = strategy_options(name)
    options = {k: v for k, v in command_line_options(args, name).items() if k in taken and v is not None}
    if "seed" in taken:
        options["seed"] = seed
    return options


def run_one(args, name: str, seed: int, out: Path) -> dict:
    stream = load_stream(args, seed)
    import torch

    torch.manual_seed(seed)
    channels, size = stream.input_shape[0], stream.input_shape[-1]
    encoder_options = {"size": size} if args.encoder == "mlp" else {}
    encoder = build_encoder(args.encoder, in_channels=channels, **encoder_options)
    learner = ContinualLearner(encoder, stream)
    options = options_for(name, args, seed)
    strategy = build_strategy(name, **options)
    run_config = {"strategy": name, "scenario": args.scenario, "setting": args.setting, "dataset": args.dataset,
                  "encoder": args.encoder, **options}
    runner = StreamRunner(learner, strategy, trainer_config(args, seed), out, run_config=run_config,
                          overwrite=args.overwrite, report=lambda line: print(line, flush=True))
    matrix = runner.run(resume=args.resume and runner.path.exists())
    plot_accuracy_matrix(matrix, out / "accuracy_matrix.png",
                         title=f"{name}: {stream.name}, {args.setting}-IL (seed {seed})")
    return runner.results()


def cell(values: list) -> str:
    values = [v for v in values if v is not None]
    return mean_std_cell([100 * v for v in values]) if values else "-"


def diverged(results: list[dict]) -> str:
    """' (k of n runs diverged)' when some runs of a --compare row stopped on a non-finite loss."""
    failed = [r for r in results if r.get("diverged")]
    return f" ({len(failed)} of {len(results)} runs diverged)" if failed else ""


def results_table(args, rows: dict[str, list[dict]]) -> str:
    runs = f"mean ± std over seeds {args.seeds}" if args.compare else f"seed {args.seed}"
    task_too = args.setting == "class"
    head = "| strategy | ACC (%) | BWT (%) | forgetting (%) |" + (" Task-IL ACC, same runs (%) |" if task_too else "") \
        + " wall time (s) |"
    lines = [f"{args.scenario}_{args.dataset}, {args.setting}-IL, {args.encoder}, {args.epochs} epoch(s) per "
             f"experience, batch {args.batch_size}, {args.optimizer} lr {args.lr}, {runs}", "", head,
             "|---|" + "---:|" * (head.count("|") - 2)]
    for name, all_results in rows.items():
        results = [r for r in all_results if not r.get("diverged")]
        if not results:
            lines.append(f"| {name}{diverged(all_results)} |" + " - |" * (head.count("|") - 2))
            continue
        metrics = [r["metrics"] for r in results]
        line = f"| {name}{diverged(all_results)} | {cell([m['acc'] for m in metrics])} | " \
               f"{cell([m['bwt'] for m in metrics])} | " \
               f"{cell([m['forgetting'] for m in metrics])} |"
        if task_too:
            line += f" {cell([r['task_metrics']['acc'] for r in results])} |"
        line += f" {mean_std_cell([sum(r['wall_times']) for r in results])} |"
        lines.append(line)
    return "\n".join(lines)


def run(args) -> int:
    names = parse_strategies(args.strategies) if args.compare else [args.strategy]
    seeds = parse_seeds(args.seeds) if args.compare else [args.seed]
    out = Path(args.out)
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        for name in names:
            run_dir = out / name / f"seed{seed}" if args.compare else out
            print(f"== {name}, seed {seed} ==", flush=True)
            try:
                result = run_one(args, name, seed, run_dir)
            except NonFiniteLossError as e:
                if not args.compare:
                    raise
                # one diverging strategy must not cost the others' runs: the table says so
                print(f"{name}, seed {seed}: diverged ({e})", flush=True)
                result = {"diverged": str(e)}
            rows.setdefault(name, []).append(result)
    write_results(out, results_table(args, rows), {"rows": rows, "args": vars(args)})
    return 0


def main(argv=None) -> int:
    return script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
