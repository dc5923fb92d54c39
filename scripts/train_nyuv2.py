#!/usr/bin/env python
"""Train a shared-encoder, per-task-decoder model on NYUv2: segmentation, depth, surface normals.

Defaults reproduce LibMTL's protocol: DeepLabV3+ decoders on a dilated ResNet-50
(output stride 16), 200 epochs, Adam 1e-4, weight decay 1e-5, StepLR(100, 0.5),
batch 8, no augmentation. Data: the mtan / LibMTL preprocessing under --data-root,
``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy``. The run folder gets
metrics.json ({task: {metric: value}}, usable as a single-task baseline file),
results.md / results.json (the table in the published layout), history.json,
checkpoints and TensorBoard events.

Examples:
  python scripts/train_nyuv2.py --smoke                 # a minute on a CPU, generated data of the real shapes
  accelerate launch scripts/train_nyuv2.py --data-root ROOT --weighting mgda_ub --mixed-precision bf16
  accelerate launch scripts/train_nyuv2.py --data-root ROOT --tasks depth --out runs/stl-depth
  accelerate launch scripts/train_nyuv2.py --data-root ROOT --architecture cross_stitch --weighting mgda
  python scripts/train_nyuv2.py --data-root ROOT --out runs/ew --baseline runs/stl-seg/metrics.json,\\
      runs/stl-depth/metrics.json,runs/stl-normal/metrics.json --delta-m all_metrics
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

import torch  # noqa: E402

from mtl.cli import (add_architecture_arguments, add_optimisation_arguments, add_output_arguments,  # noqa: E402
                     add_weighting_arguments, build_architecture_encoder, check_architecture, check_common,
                     script_main, trainer_config, weighting_options, write_results)
from mtl.data.nyuv2 import NYUv2  # noqa: E402
from mtl.data.synthetic import write_nyuv2  # noqa: E402
from mtl.delta_m import VARIANTS, Baseline, load_baseline, report_delta_m  # noqa: E402
from mtl.errors import ConfigError  # noqa: E402
from mtl.heads import DECODER_STRIDES, DenseHead, check_dense_head  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import nyuv2_tasks  # noqa: E402
from mtl.trainer import Trainer  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402

TASKS = ("segmentation", "depth", "normal")
OUT_CHANNELS = {"segmentation": 13, "depth": 1, "normal": 3}
COLUMNS = [("segmentation", "mIoU", 100), ("segmentation", "pixel_acc", 100), ("depth", "abs_err", 1),
           ("depth", "rel_err", 1), ("normal", "mean_angle", 1), ("normal", "median_angle", 1),
           ("normal", "within_11.25", 100), ("normal", "within_22.5", 100), ("normal", "within_30", 100)]
HEADERS = ["mIoU", "Pix Acc", "Abs Err", "Rel Err", "Mean", "Median", "11.25", "22.5", "30"]
PUBLISHED_EW = [54.10, 75.78, 0.3771, 0.1596, 23.53, 17.20, 34.55, 60.75, 72.06]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weighting_arguments(p, example_weights="segmentation=1,depth=1,normal=1")
    g = p.add_argument_group("model")
    g.add_argument("--tasks", default=",".join(TASKS), help="tasks to train, comma-separated (default: all three)")
    g.add_argument("--encoder", default=None,
                   help="a segmentation-models-pytorch encoder, smp:<name> (default: smp:resnet50; smoke: smp:resnet18)")
    g.add_argument("--pretrained", action="store_true", help="start from the encoder's ImageNet weights (downloads)")
    g.add_argument("--output-stride", type=int, default=16, help="encoder output stride (16: dilated, as LibMTL)")
    g.add_argument("--decoders", default="deeplabv3plus",
                   help="one decoder for all tasks, or TASK=DECODER,... (" + ", ".join(DECODER_STRIDES) + ")")
    g.add_argument("--decoder-channels", type=int, default=None, help="(default: 256; smoke: 32)")
    add_architecture_arguments(g, "smp ResNet encoders have BatchNorm layers (scale_bias); cross-stitch columns "
                                  "need an smp ResNet-family encoder")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, help="NYUv2 in the mtan/LibMTL .npy layout")
    g.add_argument("--augment", action="store_true", help="random scale-crop {1, 1.2, 1.5} and horizontal flip")
    g.add_argument("--smoke", action="store_true",
                   help="end-to-end check on generated data of the real shapes (4 train / 2 val images, "
                        "1 epoch of batch 2, a small model unless --encoder/--decoder-channels say otherwise)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--baseline", default=None,
                   help="single-task baseline file(s), JSON {task: {metric: value}}, comma-separated (e.g. the "
                        "metrics.json of single-task runs); enables delta_m")
    g.add_argument("--delta-m", default="all_metrics", choices=sorted(VARIANTS), help="delta_m definition")
    add_optimisation_arguments(p, epochs=200, batch_size=8, lr=1e-4, weight_decay=1e-5, scheduler="step",
                               step_size=100, gamma=0.5)
    add_output_arguments(p, "runs/nyuv2")
    args = check_common(p, p.parse_args(argv))
    if args.smoke:
        args.epochs, args.batch_size, args.pretrained = 1, 2, False
    args.encoder = args.encoder or ("smp:resnet18" if args.smoke else "smp:resnet50")
    args.decoder_channels = args.decoder_channels or (32 if args.smoke else 256)
    return args


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {unknown or text!r} in --tasks; choose from {', '.join(TASKS)}")
    return tasks


def parse_decoders(text: str, tasks: list[str], output_stride: int) -> dict[str, str]:
    if "=" not in text:
        decoders = {t: text.strip() for t in tasks}
    else:
        decoders = {}
        for item in text.split(","):
            task, _, decoder = item.partition("=")
            decoders[task.strip()] = decoder.strip()
        extra, missing = set(decoders) - set(tasks), set(tasks) - set(decoders)
        if extra or missing:
            raise ConfigError(f"--decoders must name each trained task once: missing {sorted(missing)}, "
                              f"unknown {sorted(extra)}")
    for task, decoder in decoders.items():
        check_dense_head(decoder, output_stride, "segmentation")
    return decoders


def build_model(args, tasks: list[str], decoders: dict[str, str]) -> MultiTaskModel:
    if not args.encoder.startswith("smp:"):
        raise ConfigError(f"dense decoders sit on segmentation-models-pytorch encoders: use smp:<name>, "
                          f"not '{args.encoder}' (e.g. smp:resnet50)")
    encoder = build_architecture_encoder(args, args.architecture, tasks, dense=True, pretrained=args.pretrained,
                                         output_stride=args.output_stride)
    kinds = {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
    heads = {t: DenseHead(encoder.out_channels, OUT_CHANNELS[t], decoders[t], args.output_stride, kinds[t],
                          args.decoder_channels) for t in tasks}
    return MultiTaskModel(encoder, heads)


def load_baselines(text: str | None) -> Baseline | None:
    if not text:
        return None
    parts = [load_baseline(path.strip()) for path in text.split(",") if path.strip()]
    values = {task: metrics for part in parts for task, metrics in part.values.items()}
    return Baseline(" + ".join(p.name for p in parts), values, text)


def results_table(metrics: dict, label: str) -> str:
    def row(name, values):
        return f"| {name} | " + " | ".join(values) + " |"

    ours = ["-" if t not in metrics else f"{metrics[t][m] * scale:.{4 if t == 'depth' else 2}f}"
            for t, m, scale in COLUMNS]
    return "\n".join([
        "| method | " + " | ".join(HEADERS) + " |",
        "|---|" + "---:|" * len(HEADERS),
        row(label, ours),
        row("EW, LibMTL (published)", [f"{v}" for v in PUBLISHED_EW]),
    ])


def main(argv=None) -> int:
    return script_main(parse_args, run, argv)


def run(args) -> int:
    tasks = parse_tasks(args.tasks)
    decoders = parse_decoders(args.decoders, tasks, args.output_stride)
    check_architecture(args.weighting, args.architecture if len(tasks) > 1 else "shared")
    options = weighting_options(args, args.weighting)
    baseline = load_baselines(args.baseline)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="nyuv2-smoke-") as root:
            return train(args, tasks, decoders, options, baseline, write_nyuv2(root, n_train=4, n_val=2))
    if args.data_root is None:
        raise ConfigError("--data-root is required (the NYUv2 .npy folder), or use --smoke for a generated check")
    return train(args, tasks, decoders, options, baseline, Path(args.data_root))


def train(args, tasks, decoders, options, baseline, root: Path) -> int:
    train_data = NYUv2(root, "train", augment=args.augment, seed=args.seed)
    val_data = NYUv2(root, "val")
    torch.manual_seed(args.seed)
    model = build_model(args, tasks, decoders)
    task_objs = [t for t in nyuv2_tasks() if t.name in tasks]
    weighting = build_weighting(args.weighting, task_objs, **options)
    run_config = {"tasks": tasks, "encoder": args.encoder, "pretrained": args.pretrained,
                  "output_stride": args.output_stride, "decoders": decoders, "decoder_channels": args.decoder_channels,
                  "architecture": args.architecture if len(tasks) > 1 else "shared",
                  "weighting": args.weighting, "weighting_options": options, "augment": args.augment,
                  "smoke": args.smoke}
    out = Path(args.out)
    trainer = Trainer(model, task_objs, weighting, train_data, val_data, trainer_config(args), out,
                      run_config=run_config, overwrite=args.overwrite)
    history = trainer.fit(resume=out if args.resume else None)
    if not trainer.accelerator.is_main_process:
        return 0
    metrics = history["epochs"][-1]["eval"]
    label = args.weighting + (f", {args.architecture}" if args.architecture != "shared" and len(tasks) > 1 else "")
    label += " (smoke, generated data)" if args.smoke else ""
    table = results_table(metrics, label)
    if baseline is not None:
        table += "\n\n" + report_delta_m(metrics, baseline, task_objs, args.delta_m)
    write_results(out, table, {"metrics": metrics, "args": vars(args)}, metrics)
    print(f"\nrun folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
