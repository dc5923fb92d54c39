"""Trains adaptation methods a few steps and saves the final state; run by test_adapt_distributed.py.

Run once as one process with the global batch, and once under ``torchrun
--nproc_per_node 2`` with half the batch per process: methods whose losses are
means over samples must agree.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from adapt.data import DigitDomain, PairedDomains
from adapt.methods import build_method, build_model
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting

METHODS = ["source_only", "dann"]


def domain(n: int, seed: int, shift: float) -> DigitDomain:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 1, 28, 28, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) / 30 + shift).clamp(0, 1)
    return DigitDomain(images.float(), labels, f"toy{seed}", "train")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, required=True, help="per process")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = {}
    for name in METHODS:
        torch.manual_seed(0)
        task = classification_task("label", 10)
        encoder = build_encoder("multilenet", dropout=0.0)
        objective = build_method(name, task)
        model = build_model(name, encoder, 10)
        weighting = build_weighting("static", objective.loss_names, weights=dict.fromkeys(objective.loss_names, 1.0))
        config = TrainerConfig(epochs=1, batch_size=args.batch_size, lr=1e-2, cpu=True, progress=False,
                               tensorboard=False, log_every=1)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(model, [task], weighting, PairedDomains(domain(64, 1, 0.0), domain(64, 2, 0.3)), None,
                              config, run_dir, objective=objective)
            history = trainer.fit()
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        results[name] = {"model": {k: v.detach().clone() for k, v in state.items()},
                         "losses": [[s["loss"][n] for n in objective.loss_names] for s in history["steps"]]}
    if trainer.accelerator.is_main_process:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
