#!/usr/bin/env python
"""Train a ResNet-18 shared encoder with 40 binary heads on CelebA (Sener & Koltun's protocol).

Data: torchvision's layout under --data-root, ``ROOT/celeba/img_align_celeba/*.jpg`` with
``list_attr_celeba.txt`` and ``list_eval_partition.txt``; images resized to 64x64.
Prints the mean error over the attributes (the paper's figure) and writes the
per-attribute errors to results.json.

Examples:
  python scripts/train_celeba.py --smoke                 # seconds on a CPU, generated data in the real layout
  accelerate launch scripts/train_celeba.py --data-root ROOT --weighting mgda_ub --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

import torch  # noqa: E402

from mtl.cli import (add_optimisation_arguments, add_output_arguments, add_weighting_arguments,  # noqa: E402
                     check_common, script_main, trainer_config, weighting_options, write_results)
from mtl.data.celeba import CelebA  # noqa: E402
from mtl.data.synthetic import write_celeba  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.errors import ConfigError  # noqa: E402
from mtl.heads import MultiLabelHead  # noqa: E402
from mtl.metrics import mean_error  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import attribute_task  # noqa: E402
from mtl.trainer import Trainer  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402

PUBLISHED = ("Sener & Koltun 2018, mean error (%): single task 8.77, uniform 9.62, Kendall 9.53, "
             "GradNorm 8.44, MGDA-UB 8.25")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weighting_arguments(p, example_weights="Smiling=2,Male=1,...")
    g = p.add_argument_group("model and data")
    g.add_argument("--encoder", default="resnet18", help="shared encoder (default: resnet18)")
    g.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (downloads)")
    g.add_argument("--data-root", default=None, help="folder holding celeba/ in torchvision's layout")
    g.add_argument("--size", type=int, default=64, help="image side after resizing (default: 64)")
    g.add_argument("--attributes", default=None, help="comma-separated subset of the 40 attributes (default: all)")
    g.add_argument("--smoke", action="store_true",
                   help="end-to-end check on 16 generated images in the real layout, 1 epoch")
    add_optimisation_arguments(p, epochs=50, batch_size=256, lr=1e-3)
    add_output_arguments(p, "runs/celeba")
    args = check_common(p, p.parse_args(argv))
    if args.smoke:
        args.epochs, args.batch_size = 1, 4
    return args


def main(argv=None) -> int:
    return script_main(parse_args, run, argv)


def run(args) -> int:
    options = weighting_options(args, args.weighting)
    build_encoder(args.encoder)  # fail on a bad name before any data work
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="celeba-smoke-") as root:
            return train(args, options, write_celeba(root, n=16, height=72, width=60))
    if args.data_root is None:
        raise ConfigError("--data-root is required (the folder holding celeba/), or use --smoke")
    return train(args, options, Path(args.data_root))


def train(args, options, root: Path) -> int:
    attributes = [a.strip() for a in args.attributes.split(",")] if args.attributes else None
    train_data = CelebA(root, "train", size=args.size, attributes=attributes)
    val_data = CelebA(root, "valid", size=args.size, attributes=attributes)
    names = list(train_data.attributes)
    torch.manual_seed(args.seed)
    encoder = build_encoder(args.encoder, pretrained=args.pretrained)
    model = MultiTaskModel(encoder, {a: MultiLabelHead(encoder.out_features, 1) for a in names})
    tasks = [attribute_task(a) for a in names]
    weighting = build_weighting(args.weighting, tasks, **options)
    run_config = {"encoder": args.encoder, "pretrained": args.pretrained, "size": args.size, "attributes": names,
                  "weighting": args.weighting, "weighting_options": options, "smoke": args.smoke}
    out = Path(args.out)
    trainer = Trainer(model, tasks, weighting, train_data, val_data, trainer_config(args), out,
                      run_config=run_config, overwrite=args.overwrite)
    history = trainer.fit(resume=out if args.resume else None)
    if not trainer.accelerator.is_main_process:
        return 0
    metrics = history["epochs"][-1]["eval"]
    error = 100 * mean_error(metrics)
    table = "\n".join([
        f"CelebA mean error over {len(names)} attributes (%), {args.encoder}, {args.size}x{args.size}, "
        f"{args.weighting} weighting" + (" (smoke, generated data)" if args.smoke else ""),
        "", "| method | mean error (%) |", "|---|---:|", f"| {args.weighting} | {error:.2f} |",
        "", f"Published, for scale: {PUBLISHED}.",
    ])
    write_results(out, table, {"mean_error_percent": error, "metrics": metrics, "args": vars(args)}, metrics)
    print(f"\nrun folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
