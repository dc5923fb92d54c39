"""Adaptation methods as Trainer objectives: each trains end to end on a tiny pair of domains."""

from __future__ import annotations

import math

import pytest
import torch

from adapt.data import DigitDomain, PairedDomains, TaskTargets
from adapt.losses import dann_lambda, dann_lr_factor
from adapt.methods import METHODS, build_method, build_model
from adapt.methods.base import split_batch
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting


def domain(n: int, seed: int, shift: float = 0.0, name: str = "toy") -> DigitDomain:
    """Random 28x28 grey images whose mean brightness carries the label; ``shift`` moves the domain."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) / 20 + shift).clamp(0, 1)
    return DigitDomain(images.float(), labels, name, "train")


def build(method: str, run_dir, epochs=1, batch_size=16, scheduler="none", **options):
    source, target = domain(64, 0), domain(48, 1, shift=0.2, name="shifted")
    label_task = classification_task("label", 10)
    torch.manual_seed(0)
    encoder = build_encoder("multilenet", dropout=0.0)
    objective = build_method(method, label_task, encoder=encoder, image_shape=(1, 28, 28), **options)
    model = build_model(method, encoder, 10)
    weighting = build_weighting("static", objective.loss_names, weights=dict.fromkeys(objective.loss_names, 1.0))
    config = TrainerConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, cpu=True, progress=False,
                           tensorboard=False, log_every=1, scheduler=scheduler)
    paired = PairedDomains(target if method == "target_only" else source, target)
    return Trainer(model, [label_task], weighting, paired, TaskTargets(domain(20, 2, 0.2), "label"), config,
                   run_dir, objective=objective)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_end_to_end(tmp_path, method):
    trainer = build(method, tmp_path)
    history = trainer.fit()
    assert history["losses"] == list(trainer.objective.loss_names)
    assert history["tasks"] == ["label"]  # only the label head is evaluated
    assert len(history["steps"]) == (3 if method == "target_only" else 4)  # 48 or 64 pairs / batch 16
    for step in history["steps"]:
        assert all(math.isfinite(v) for v in step["loss"].values())
    assert 0.0 <= history["epochs"][-1]["eval"]["label"]["accuracy"] <= 1.0
    expected = {"source_only": ["classification"], "target_only": ["classification"],
                "mmd": ["classification", "mmd"], "coral": ["classification", "coral"],
                "dann": ["classification", "domain"], "rtn": ["classification", "entropy", "mmd"],
                "dsn": ["classification", "difference", "reconstruction", "similarity"],
                "dsn_mmd": ["classification", "difference", "reconstruction", "similarity"]}[method]
    assert trainer.objective.loss_names == expected


def test_dann_follows_the_papers_lambda_and_learning_rate_schedules(tmp_path):
    trainer = build("dann", tmp_path, epochs=2)
    history = trainer.fit()
    # 8 steps in all: progress of the last step is 1, so lambda is lambda_1 and lr is mu_0 / 11^0.75
    assert trainer.objective.lambda_ == pytest.approx(dann_lambda(1.0))
    net = trainer.accelerator.unwrap_model(trainer.model)
    assert net.heads["domain"].reversal.lambda_ == pytest.approx(dann_lambda(1.0))
    assert history["epochs"][-1]["lr"] == pytest.approx(1e-3 * dann_lr_factor(1.0))
    # the first epoch ended at step 4 of 8: progress 3/7
    assert history["epochs"][0]["lr"] == pytest.approx(1e-3 * dann_lr_factor(3 / 7))


def test_dann_reverses_the_domain_gradient_into_the_encoder(tmp_path):
    trainer = build("dann", tmp_path)
    net = trainer.accelerator.unwrap_model(trainer.model)
    objective = trainer.objective
    objective.lambda_ = 0.5
    batch = next(iter(trainer.train_loader))
    losses, z = objective.losses(trainer.model, batch)
    weight = net.encoder.conv1.weight
    reversed_grad = torch.autograd.grad(losses["domain"], weight, retain_graph=True)[0]
    # the same loss without the reversal layer
    logits = net.heads["domain"].net(z.flatten(1)).squeeze(1)
    n = len(batch["source"][0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    plain = bce(logits[:n], torch.zeros(n)) + bce(logits[n:], torch.ones(len(logits) - n))
    plain_grad = torch.autograd.grad(plain, weight)[0]
    assert torch.allclose(reversed_grad, -0.5 * plain_grad, atol=1e-6)
    assert plain_grad.abs().sum() > 0


def test_methods_refuse_batches_that_are_not_paired():
    with pytest.raises(ConfigError, match="PairedDomains"):
        split_batch((torch.zeros(2, 1, 28, 28), torch.zeros(2)))


def test_unknown_method_and_bad_options():
    task = classification_task("label", 10)
    with pytest.raises(ConfigError, match="unknown adaptation method 'adabn'"):
        build_method("adabn", task)
    with pytest.raises(ConfigError, match="bad options for adaptation method 'dann'"):
        build_method("dann", task, momentum=0.9)


def test_trainer_checks_the_objective_against_the_weighting_and_the_schedule(tmp_path):
    with pytest.raises(ConfigError, match="anneals the learning rate itself"):
        build("dann", tmp_path / "a", scheduler="step")
    objective = build_method("mmd", classification_task("label", 10))
    model = build_model("mmd", build_encoder("multilenet"), 10)
    with pytest.raises(ConfigError, match=r"FeatureAlignment's losses are \['classification', 'mmd'\]"):
        Trainer(model, [classification_task("label", 10)], build_weighting("equal", ["classification"]),
                PairedDomains(domain(16, 0), domain(16, 1)), None, TrainerConfig(epochs=1, batch_size=8, cpu=True),
                tmp_path / "b", objective=objective)
