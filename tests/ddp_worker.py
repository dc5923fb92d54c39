"""Trains a few steps with every weighting and saves the final state; run by test_distributed.py.

Run once as one process with the global batch, and once under
``torchrun --nproc_per_node 2`` with half the batch per process: the two must agree.
Dropout is off so that the processes' different random streams do not matter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import TwoTaskDigits  # noqa: E402
from mtl.config import TrainerConfig  # noqa: E402
from mtl.encoders import build_encoder  # noqa: E402
from mtl.heads import ClassificationHead  # noqa: E402
from mtl.model import MultiTaskModel  # noqa: E402
from mtl.tasks import classification_task  # noqa: E402
from mtl.trainer import Trainer  # noqa: E402
from mtl.weighting import build_weighting  # noqa: E402

WEIGHTINGS = ["equal", "uncertainty", "gradnorm", "mgda", "mgda_ub"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, required=True, help="per process")
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = {}
    for name in WEIGHTINGS:
        torch.manual_seed(0)
        encoder = build_encoder("multilenet", dropout=0.0)
        model = MultiTaskModel(encoder, {t: ClassificationHead(50, 10, hidden=50) for t in ("a", "b")})
        tasks = [classification_task(t, 10) for t in ("a", "b")]
        options = {"normalization": "loss+"} if name.startswith("mgda") else {}
        weighting = build_weighting(name, tasks, **options)
        config = TrainerConfig(epochs=1, batch_size=args.batch_size, lr=1e-2, cpu=True, progress=False,
                               tensorboard=False, log_every=1, mixed_precision=args.mixed_precision)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(model, tasks, weighting, TwoTaskDigits(args.steps * args.global_batch, seed=3),
                              None, config, run_dir)
            history = trainer.fit()
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        results[name] = {
            "model": {k: v.detach().clone() for k, v in state.items()},
            "weighting": {k: v.detach().clone() for k, v in weighting.state_dict().items() if torch.is_tensor(v)},
            "weights": [[s["weights"][t] for t in ("a", "b")] for s in history["steps"]],
            "losses": [[s["loss"][t] for t in ("a", "b")] for s in history["steps"]],
        }
    if trainer.accelerator.is_main_process:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
