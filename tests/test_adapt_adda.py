"""ADDA (Tzeng et al. 2017): hand-checked losses and updates, two stages through the Trainer, exact resume.

Run as a script, this file is the worker of the two-process test (``-m slow``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.data import DigitDomain, PairedDomains, TaskTargets
from adapt.methods import build_method, build_model
from adapt.methods.adda import ADDA, Discriminator, build_adda
from mtl import checkpoint as ckpt
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError, NonFiniteLossError
from mtl.model import MultiTaskModel
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting

LOSSES = ["discriminator", "adversarial"]


# ----- tiny domains and builders -------------------------------------------------------------
def domain(n: int, seed: int, shift: float = 0.0, name: str = "toy") -> DigitDomain:
    """Random 28x28 grey images whose brightness carries the label; ``shift`` brightens the whole domain."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) / 20 + shift).clamp(0, 1)
    return DigitDomain(images.float(), labels, name, "train")


def paired() -> PairedDomains:
    return PairedDomains(domain(64, 0), domain(48, 1, shift=0.2, name="shifted"))  # 64 pairs: 4 steps of 16


def stage1_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model("source_only", build_encoder("multilenet", dropout=0.0), 10)


def make_trainer(run_dir, model, objective, trainer_cls=Trainer, epochs=1, **config) -> Trainer:
    label_task = classification_task("label", 10)
    weighting = build_weighting("static", objective.loss_names, weights=dict.fromkeys(objective.loss_names, 1.0))
    settings = dict(epochs=epochs, batch_size=16, lr=2e-4, cpu=True, progress=False, tensorboard=False,
                    log_every=1, scheduler="none")
    settings.update(config)
    return trainer_cls(model, [label_task], weighting, paired(), TaskTargets(domain(20, 2, 0.2), "label"),
                       TrainerConfig(**settings), run_dir, objective=objective)


def stage2(run_dir, trainer_cls=Trainer, epochs=1, adda_options=None, **config) -> Trainer:
    model, objective = build_adda(stage1_model(), **(adda_options or {}))
    return make_trainer(run_dir, model, objective, trainer_cls=trainer_cls, epochs=epochs, **config)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adam_first_step(p: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> torch.Tensor:
    """Adam's first update from zero moments: m_hat = g and v_hat = g^2, so p - lr g / (|g| + eps)."""
    return p - lr * grad / (grad.abs() + eps)


def one_dim_adda(kind: str, lr: float = 0.1, w: float = 0.0, b: float = 0.0) -> ADDA:
    """ADDA on 1-d features with a linear discriminator D(z) = w z + b (hand-checkable)."""
    objective = ADDA(nn.Linear(1, 1), hidden=(), kind=kind, lr=lr)
    with torch.no_grad():
        objective.discriminator.net[0].weight.fill_(w)
        objective.discriminator.net[0].bias.fill_(b)
    return objective


def hand_discriminator_loss(d_s, d_t, kind):
    if kind == "bce":  # -log D(source) - log(1 - D(target)), D = sigmoid(logit)
        return -F.logsigmoid(d_s).mean() - F.logsigmoid(-d_t).mean()
    return ((d_s - 1) ** 2).mean() + (d_t ** 2).mean()


def hand_generator_loss(d_t, kind):
    if kind == "bce":  # -log D(target): target labelled "source"
        return -F.logsigmoid(d_t).mean()
    return ((d_t - 1) ** 2).mean()


# ----- stage 2 from stage 1 -------------------------------------------------------------------
def test_stage_two_starts_from_copies_of_the_source_encoder_and_classifier():
    source = stage1_model()
    model, objective = build_adda(source)
    for part in (model.encoder, objective.source_encoder):
        assert same(tensors(part), tensors(source.encoder))  # M_t starts as M_s
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(part.parameters(), source.encoder.parameters()))
    assert same(tensors(model.heads["label"]), tensors(source.heads["label"]))
    assert model.task_names == ["label"]
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.heads["label"].parameters())
    assert not any(p.requires_grad for p in objective.source_encoder.parameters())
    assert all(p.requires_grad for p in source.parameters())  # the stage-1 model is left as it was
    objective.train()
    assert not objective.source_encoder.training and objective.discriminator.training
    # the paper's discriminator for LeNet features: 50 -> 500 -> 500 -> 1 with ReLU
    layers = [type(m).__name__ for m in objective.discriminator.net]
    assert layers == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in objective.discriminator.net if isinstance(m, nn.Linear)] == [500, 500, 1]
    assert objective.discriminator.in_features == 50
    group = objective.optimizer.param_groups[0]
    assert isinstance(objective.optimizer, torch.optim.Adam)
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
    assert ADDA.own_optimizer and ADDA.custom_step and objective.loss_names == LOSSES


# ----- the two losses, by hand ----------------------------------------------------------------
def test_a_discriminator_step_lowers_its_loss_bce_by_hand():
    """D(z) = w z + b from w = b = 0; source z = 1, target z = -1; Adam, lr 0.1."""
    objective = one_dim_adda("bce")
    z_s, z_t = torch.ones(2, 1), -torch.ones(2, 1)
    before = objective.discriminator_step(z_s, z_t)
    assert before.item() == pytest.approx(2 * math.log(2))  # -log 1/2 - log 1/2
    # dL/dw = mean_s (sigmoid(0) - 1) * 1 + mean_t sigmoid(0) * (-1) = -1, dL/db = -1/2 + 1/2 = 0:
    # Adam's first step moves w by -lr * sign(-1) = +0.1 and leaves b at 0.
    assert objective.discriminator.net[0].weight.item() == pytest.approx(0.1, abs=1e-7)
    assert objective.discriminator.net[0].bias.item() == 0.0
    after = objective.discriminator_loss(z_s, z_t).item()
    assert after == pytest.approx(2 * math.log(1 + math.exp(-0.1)))  # 1.288793...
    assert after < before.item()


def test_a_discriminator_step_lowers_its_loss_lsgan_by_hand():
    """Least squares: L = mean (D(z_s) - 1)^2 + mean D(z_t)^2 = 1 at w = b = 0; dL/dw = dL/db = -2."""
    objective = one_dim_adda("lsgan")
    z_s, z_t = torch.ones(2, 1), -torch.ones(2, 1)
    assert objective.discriminator_step(z_s, z_t).item() == pytest.approx(1.0)
    assert objective.discriminator.net[0].weight.item() == pytest.approx(0.1, abs=1e-7)
    assert objective.discriminator.net[0].bias.item() == pytest.approx(0.1, abs=1e-7)
    # D(z_s) = 0.2, D(z_t) = 0: (0.2 - 1)^2 + 0 = 0.64
    assert objective.discriminator_loss(z_s, z_t).item() == pytest.approx(0.64)


@pytest.mark.parametrize("kind, expected", [("bce", math.log(1 + math.exp(0.1))), ("lsgan", 1.21)])
def test_the_generator_loss_labels_target_features_as_source(kind, expected):
    """D = 0.1 z; target z = -1 gives D = -0.1. Inverted labels: -log sigmoid(-0.1), or (-0.1 - 1)^2."""
    objective = one_dim_adda(kind, w=0.1)
    z_t = torch.full((3, 1), -1.0, requires_grad=True)
    loss = objective.generator_loss(z_t)
    assert loss.item() == pytest.approx(expected)
    if kind == "bce":  # not the minimax form log(1 - D) nor the discriminator's target term -log(1 - D)
        assert loss.item() != pytest.approx(math.log(1 + math.exp(-0.1)))
    loss.backward()
    assert (z_t.grad < 0).all()  # descending moves the target features towards the source side (z = +1)
    assert all(p.grad is None for p in objective.discriminator.parameters())  # D is not trained by this loss
    assert all(p.requires_grad for p in objective.discriminator.parameters())


@pytest.mark.parametrize("kind", ["bce", "lsgan"])
def test_losses_match_the_formulas_on_random_features(kind):
    torch.manual_seed(3)
    objective = ADDA(nn.Linear(4, 5), hidden=(7,), kind=kind)
    z_s, z_t = torch.randn(6, 5), torch.randn(4, 5)
    d = objective.discriminator
    assert torch.allclose(objective.discriminator_loss(z_s, z_t), hand_discriminator_loss(d(z_s), d(z_t), kind))
    assert torch.allclose(objective.generator_loss(z_t), hand_generator_loss(d(z_t), kind))


# ----- one alternating step through the Trainer ------------------------------------------------
@pytest.mark.parametrize("kind", ["bce", "lsgan"])
def test_one_step_updates_the_discriminator_then_the_target_encoder_against_the_new_discriminator(tmp_path, kind):
    lr, d_lr = 0.1, 0.05
    trainer = stage2(tmp_path, optimizer="sgd", momentum=0.0, lr=lr, adda_options={"kind": kind, "lr": d_lr})
    net, objective = trainer.accelerator.unwrap_model(trainer.model), trainer.objective
    batch = next(iter(trainer.train_loader))
    x_s, x_t = batch["source"][0], batch["target"]
    encoder0, d0 = copy.deepcopy(net.encoder), copy.deepcopy(objective.discriminator)
    source0, head0 = tensors(objective.source_encoder), tensors(net.heads["label"])
    monitored, _ = objective.losses(trainer.model, batch)  # the same losses, without an update

    losses, weights = trainer.train_step(batch)

    z_s, z_t = objective.source_encoder(x_s).detach(), encoder0(x_t)
    # (1) D: source labelled 1, target 0, target features from the encoder before the step
    d_loss = hand_discriminator_loss(d0(z_s), d0(z_t.detach()), kind)
    assert losses["discriminator"] == pytest.approx(d_loss.item(), rel=1e-6)
    assert monitored["discriminator"].item() == pytest.approx(d_loss.item(), rel=1e-6)
    assert monitored["adversarial"].item() == pytest.approx(hand_generator_loss(d0(z_t), kind).item(), rel=1e-6)
    d1 = copy.deepcopy(d0)
    for p, g in zip(d1.parameters(), torch.autograd.grad(d_loss, list(d0.parameters()))):
        p.data = adam_first_step(p.data, g, d_lr)
    for p, q in zip(objective.discriminator.parameters(), d1.parameters()):
        # Adam's first step is about d_lr * sign(g); where |g| is near Adam's eps (1e-8) float rounding of g
        # moves it by a little, so the tolerance is 1e-3 of d_lr (a wrong sign or label would be off by 2 d_lr)
        assert torch.allclose(p, q, atol=1e-3 * d_lr)
    # (2) M_t: target labelled 1 against the UPDATED discriminator, plain SGD step of the Trainer's optimizer
    g_loss = hand_generator_loss(d1(z_t), kind)
    assert losses["adversarial"] == pytest.approx(g_loss.item(), rel=1e-6)
    grads = torch.autograd.grad(g_loss, list(encoder0.parameters()))
    old_grads = torch.autograd.grad(hand_generator_loss(d0(encoder0(x_t)), kind), list(encoder0.parameters()))
    for p, p0, g, g_old in zip(net.encoder.parameters(), encoder0.parameters(), grads, old_grads):
        assert torch.allclose(p, p0 - lr * g, atol=1e-7)
    assert max((lr * (g - g_old)).abs().max().item() for g, g_old in zip(grads, old_grads)) > 1e-5
    assert weights == {"discriminator": 1.0, "adversarial": 1.0}
    assert same(tensors(objective.source_encoder), source0) and same(tensors(net.heads["label"]), head0)


# ----- both stages end to end ------------------------------------------------------------------
def test_two_stages_train_end_to_end_and_only_the_target_encoder_and_discriminator_move(tmp_path):
    label_task = classification_task("label", 10)
    source_only = build_method("source_only", label_task)
    stage1 = make_trainer(tmp_path / "stage1", stage1_model(), source_only, lr=1e-3)
    stage1.fit()
    trained = stage1.accelerator.unwrap_model(stage1.model)
    model, objective = build_adda(trained)
    encoder0, head0, d0 = tensors(model.encoder), tensors(model.heads["label"]), tensors(objective.discriminator)

    trainer = make_trainer(tmp_path / "stage2", model, objective)
    history = trainer.fit()

    assert history["losses"] == LOSSES and history["tasks"] == ["label"]
    assert len(history["steps"]) == 4  # 64 pairs / batch 16
    for step in history["steps"]:
        assert set(step["loss"]) == set(LOSSES) and all(math.isfinite(v) for v in step["loss"].values())
        assert step["weights"] == {"discriminator": 1.0, "adversarial": 1.0}
    assert 0.0 <= history["epochs"][-1]["eval"]["label"]["accuracy"] <= 1.0
    net = trainer.accelerator.unwrap_model(trainer.model)
    assert same(tensors(objective.source_encoder), tensors(trained.encoder))  # M_s: bit-equal to stage 1
    assert same(tensors(net.heads["label"]), head0)  # C: bit-equal
    assert not same(tensors(net.encoder), encoder0)  # M_t trained
    assert not same(tensors(objective.discriminator), d0)  # D trained
    assert len(objective.optimizer.state) == len(list(objective.discriminator.parameters()))
    # D's parameters are not in the Trainer's optimizer, and its Adam has taken one step per batch
    trainer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not trainer_params & {id(p) for p in objective.parameters()}
    assert all(s["step"].item() == 4 for s in objective.optimizer.state.values())


# ----- exact resume -----------------------------------------------------------------------------
class Killed(Exception):
    """Stands in for the process dying at a chosen step."""


def killed_at(step: int):
    class KillingTrainer(Trainer):
        def train_step(self, batch):
            if self.progress.step + 1 == step:
                raise Killed
            return super().train_step(batch)

    return KillingTrainer


def final_state(trainer) -> tuple[dict, dict, dict]:
    objective = trainer.objective
    adam = {f"{i}.{k}": v.clone() for i, s in objective.optimizer.state.items() for k, v in s.items()}
    return tensors(trainer.accelerator.unwrap_model(trainer.model)), tensors(objective), adam


def run_killed_and_resumed(run_dir, kill_at=7):
    """2 epochs x 4 steps, a checkpoint every 3 steps (and at epoch ends): killed at step 7, resumed from 6."""
    options = dict(epochs=2, checkpoint_every=3)
    with pytest.raises(Killed):
        stage2(run_dir, trainer_cls=killed_at(kill_at), **options).fit()
    assert ckpt.load_checkpoint(run_dir)["progress"]["step"] == 6
    torch.manual_seed(12345)  # the crashed process's RNG must not matter
    resumed = stage2(run_dir, **options)
    return resumed.fit(resume=run_dir), resumed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = stage2(tmp_path_factory.mktemp("adda_reference"), epochs=2, checkpoint_every=3)
    return trainer.fit(), final_state(trainer)


def test_a_run_killed_mid_epoch_resumes_to_bit_equal_weights(tmp_path, uninterrupted):
    ref_history, (ref_model, ref_objective, ref_adam) = uninterrupted
    history, trainer = run_killed_and_resumed(tmp_path)
    model, objective, adam = final_state(trainer)
    assert same(model, ref_model) and same(objective, ref_objective) and same(adam, ref_adam)
    assert history["steps"] == ref_history["steps"]
    assert [e["eval"] for e in history["epochs"]] == [e["eval"] for e in ref_history["epochs"]]


def test_the_resume_check_fails_without_the_discriminator_optimizer_state(tmp_path, uninterrupted, monkeypatch):
    """The same resume, with D's Adam state dropped from the checkpoint, ends elsewhere."""
    monkeypatch.setattr(ADDA, "set_extra_state", lambda self, state: None)
    _, trainer = run_killed_and_resumed(tmp_path)
    reference_d = {k: v for k, v in uninterrupted[1][1].items() if k.startswith("discriminator.")}
    assert not same({k: v for k, v in tensors(trainer.objective).items() if k.startswith("discriminator.")},
                    reference_d)


# ----- non-finite losses -----------------------------------------------------------------------
def nan_batch(trainer):
    batch = next(iter(trainer.train_loader))
    batch["target"] = torch.full_like(batch["target"], float("nan"))
    return batch


def test_a_nan_loss_stops_before_any_update(tmp_path):
    trainer = stage2(tmp_path)
    before = final_state(trainer)[:2]
    with pytest.raises(NonFiniteLossError, match="'discriminator'"):
        trainer.train_step(nan_batch(trainer))
    after = final_state(trainer)[:2]
    assert same(before[0], after[0]) and same(before[1], after[1])


def test_a_nan_loss_is_skipped_with_on_nonfinite_skip(tmp_path):
    trainer = stage2(tmp_path, on_nonfinite="skip")
    before = final_state(trainer)[:2]
    assert trainer.train_step(nan_batch(trainer)) is None
    assert trainer.history["skipped_steps"] == 1
    after = final_state(trainer)[:2]
    assert same(before[0], after[0]) and same(before[1], after[1])


# ----- bad input --------------------------------------------------------------------------------
def test_a_stage_one_model_without_a_label_head_is_refused():
    model = MultiTaskModel(build_encoder("multilenet"), {"digit": nn.Linear(50, 10)})
    with pytest.raises(ConfigError, match=r"no 'label' head \(heads: \['digit'\]\)"):
        build_adda(model)
    with pytest.raises(ConfigError, match="stage-1 MultiTaskModel"):
        build_adda(build_encoder("multilenet"))


def test_mismatched_feature_sizes_are_refused():
    with pytest.raises(ConfigError, match=r"feature_dim=64 does not match the encoder's output size .*= 50"):
        build_adda(stage1_model(), feature_dim=64)
    # an encoder that does not declare its width: caught on the first batch, naming both sizes
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="pass feature_dim"):
        ADDA(encoder)
    objective = ADDA(encoder, feature_dim=5)
    with pytest.raises(ConfigError, match=r"takes 5 features but got 3"):
        objective.discriminator_loss(objective.source_features(torch.zeros(2, 4)), torch.zeros(2, 3))


def test_bad_options_are_refused():
    encoder = nn.Linear(2, 3)
    with pytest.raises(ConfigError, match="unknown adversarial loss kind 'wgan'"):
        ADDA(encoder, kind="wgan")
    with pytest.raises(ConfigError, match="learning rate must be a positive number, got -1"):
        ADDA(encoder, lr=-1)
    with pytest.raises(ConfigError, match=r"betas must be two numbers in \[0, 1\), got \(0.5, 1.5\)"):
        ADDA(encoder, betas=(0.5, 1.5))
    with pytest.raises(ConfigError, match="hidden must be a sequence"):
        ADDA(encoder, hidden=500)
    with pytest.raises(ConfigError, match="each hidden layer size must be a positive integer, got 0"):
        ADDA(encoder, hidden=(500, 0))
    with pytest.raises(ConfigError, match="pre-trained source encoder"):
        ADDA("multilenet")
    with pytest.raises(ConfigError, match="positive integer"):
        Discriminator(0)


# ----- two processes -----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo) with batch 8 each vs 1 process with batch 16: same weights.

    Checks that D's gradients are averaged (``all_mean_grads``) and that M_t's are too, which DDP
    does only for a forward through the wrapped model.
    """
    one, two = run_worker(tmp_path, 1), run_worker(tmp_path, 2)
    assert torch.tensor(one["losses"]) == pytest.approx(torch.tensor(two["losses"]), abs=1e-5)
    for part in ("model", "objective"):
        for key, value in one[part].items():
            assert torch.allclose(value, two[part][key], atol=1e-5), f"{part} tensor {key} differs"
    assert not torch.allclose(one["model"]["encoder.fc.weight"], one["start"]["encoder.fc.weight"], atol=1e-4)


def run_worker(tmp_path, processes: int) -> dict:
    out = tmp_path / f"{processes}.pt"
    args = [__file__, "--batch-size", str(16 // processes), "--out", str(out),
            "--run-dir", str(tmp_path / str(processes))]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29600 + os.getpid() % 1000), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def worker(argv=None) -> None:
    """One epoch of stage 2 (4 steps with a global batch of 16); saves the final state to --out."""
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    model, objective = build_adda(stage1_model(), hidden=(32, 32), lr=1e-2)
    start = tensors(model)
    trainer = make_trainer(args.run_dir, model, objective, batch_size=args.batch_size, lr=1e-2)
    trainer.eval_loader = None  # no evaluation: only the training updates are compared
    history = trainer.fit()
    if trainer.accelerator.is_main_process:
        torch.save({"model": tensors(trainer.accelerator.unwrap_model(trainer.model)),
                    "objective": tensors(trainer.objective), "start": start,
                    "losses": [[s["loss"][n] for n in LOSSES] for s in history["steps"]]}, args.out)


if __name__ == "__main__":
    worker()
