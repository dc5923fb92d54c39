"""Learning without Memorizing: Grad-CAM by hand, L_AD's values and gradient, training, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.learner import ContinualLearner
from continual.runner import StreamRunner
from continual.strategies.base import ContinualObjective
from continual.strategies.lwm import LwM, attention_distillation, grad_cam, last_conv_layer
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError

from test_continual_runner import crash_then_resume, run_differences, tiny_split


def lwm_runner(run_dir, setting="task", encoder="multilenet", **options):
    stream = tiny_split(setting)
    torch.manual_seed(0)
    extra = {"size": 28, "hidden": (32,)} if encoder == "mlp" else {}
    learner = ContinualLearner(build_encoder(encoder, in_channels=1, **extra), stream)
    # Adam: L_AD is invariant to the scale of the maps, so its gradient grows as they shrink
    config = TrainerConfig(epochs=4, batch_size=8, optimizer="adam", lr=5e-3, seed=0, progress=False,
                           tensorboard=False)
    return StreamRunner(learner, LwM(**options), config, run_dir, run_config={"strategy": "lwm"})


def test_grad_cam_equals_the_map_computed_by_hand():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, kernel_size=2)
    w = torch.randn(2, 2, 2)  # a linear score on the rectified 2 x (2 x 2) feature maps
    x = torch.randn(3, 1, 3, 3)
    activations = conv(x)
    scores = (w * F.relu(activations)).flatten(1).sum(1)
    got = grad_cam(activations, scores)
    a = activations.detach()
    d_score = w * (a > 0)  # d score / d A, by hand
    alpha = d_score.mean(dim=(2, 3))  # (N, K): one weight per map
    expected = torch.zeros(3, 4)
    for n in range(3):
        expected[n] = torch.clamp(alpha[n, 0] * a[n, 0] + alpha[n, 1] * a[n, 1], min=0).flatten()
    torch.testing.assert_close(got, expected)


def test_attention_distillation_on_hand_checked_vectors():
    old = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised: [0.6, 0.8], [0, 1]
    new = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # normalised: [1, 0], [0, 1]
    assert attention_distillation(old, new).item() == pytest.approx((0.4 + 0.8 + 0.0) / 2)
    assert attention_distillation(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0  # no NaN from 0 / 0


def test_the_attention_loss_gradient_matches_finite_differences():
    """L_AD through both Grad-CAM maps, differentiated twice (create_graph), checked numerically."""
    torch.manual_seed(1)
    x = torch.randn(4, 1, 4, 4, dtype=torch.double)
    old_conv, old_fc = torch.randn(3, 1, 2, 2, dtype=torch.double), torch.randn(2, 27, dtype=torch.double)

    def model(conv, fc, leaf=False):
        activations = F.conv2d(x, conv)
        if leaf:
            activations = activations.detach().requires_grad_(True)
        return activations, F.relu(activations).flatten(1) @ fc.T

    old_activations, old_scores = model(old_conv, old_fc, leaf=True)
    base = old_scores.argmax(1, keepdim=True)
    q_old = grad_cam(old_activations, old_scores.gather(1, base)).detach()

    def l_ad(conv, fc):
        activations, scores = model(conv, fc)
        return attention_distillation(q_old, grad_cam(activations, scores.gather(1, base), create_graph=True))

    conv = (old_conv + 0.3 * torch.randn_like(old_conv)).requires_grad_(True)
    fc = (old_fc + 0.3 * torch.randn_like(old_fc)).requires_grad_(True)
    assert l_ad(conv, fc).item() > 0
    assert torch.autograd.gradcheck(lambda c, f: l_ad(c, f).double(), (conv, fc))


def test_last_conv_layer_and_a_clear_error_without_one(tmp_path):
    assert last_conv_layer(build_encoder("multilenet", in_channels=1)) == "conv2"
    with pytest.raises(ConfigError, match="LwM needs a convolutional encoder, e.g. --encoder multilenet"):
        lwm_runner(tmp_path / "run", encoder="mlp")


def second_experience(tmp_path, setting):
    """A learner at its second experience, LwM's old model taken, and a batch of that experience."""
    runner = lwm_runner(tmp_path / "run", setting)
    learner, strategy = runner.learner, runner.strategy
    learner.prepare(learner.stream[0])
    learner.prepare(learner.stream[1])
    strategy.before_experience(learner, learner.stream[1])
    x = learner.stream[1].train.images[:6].clone()
    y = torch.tensor([0, 1, 0, 1, 0, 1]) if setting == "task" else torch.tensor([2, 3, 2, 3, 2, 3])
    return learner, strategy, (x, y, torch.full((6,), learner.stream[1].task_id))


@pytest.mark.parametrize("setting", ["task", "class"])
def test_attention_loss_is_zero_for_the_same_model_and_positive_otherwise(tmp_path, setting):
    learner, strategy, batch = second_experience(tmp_path, setting)
    objective = ContinualObjective(strategy, learner)
    learner.model.eval()  # dropout off: the model is exactly its snapshot
    losses, _ = objective.losses(learner.model, batch)
    assert set(losses) == {"current", "distillation", "attention"}
    assert losses["attention"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        learner.model.encoder.conv1.weight.add_(0.3 * torch.randn_like(learner.model.encoder.conv1.weight))
    losses, _ = objective.losses(learner.model, batch)
    assert losses["attention"].item() > 0.01
    assert torch.isfinite(losses["distillation"])


def test_the_gradient_of_the_attention_loss_reaches_the_encoder_and_the_old_head(tmp_path):
    learner, strategy, batch = second_experience(tmp_path, "task")
    model = learner.model
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    losses, _ = ContinualObjective(strategy, learner).losses(model, batch)
    losses["attention"].backward()
    encoder = model.encoder
    # conv1 feeds the activations; fc and the old head act only through the Grad-CAM weights
    # (d score / d A), so their gradient exists only because the map kept its graph
    for name, p in [("conv1", encoder.conv1.weight), ("conv2", encoder.conv2.weight), ("fc", encoder.fc.weight),
                    ("old head", model.heads["task0"].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runner = lwm_runner(tmp_path_factory.mktemp("lwm") / "run")
    runner.run()
    return runner


def test_lwm_trains_a_task_il_stream_with_the_multilenet_encoder(reference):
    values = reference.matrix.values
    for i in range(3):  # 12 test images an experience, 2 classes: chance is 0.5
        assert values[i, i] >= 0.75, f"experience {i} barely learnt: {values}"
    assert values[2, 0] >= 0.9, f"the first experience is forgotten: {values}"
    for index, active in (("0", False), ("2", True)):  # no old model at the first experience
        history = json.loads((reference.run_dir / "experiences" / index / "history.json").read_text())
        losses = history["epochs"][-1]["train_loss"]
        assert (losses["attention"] > 0 and losses["distillation"] > 0) == active, (index, losses)
    assert not reference.strategy._probes  # no hook left on the model between experiences
    assert not reference.learner.model.encoder.conv2._forward_hooks


def test_an_lwm_run_killed_mid_experience_resumes_to_the_same_matrix_and_weights(reference, tmp_path, monkeypatch):
    # step 36: in the middle of the second experience (24 steps per experience)
    resumed = crash_then_resume(lambda: lwm_runner(tmp_path / "run"), monkeypatch, 36)
    assert not run_differences(resumed, reference.matrix.values, reference.learner.model.state_dict())


def test_bad_weights_are_refused():
    with pytest.raises(ConfigError, match="attention"):
        LwM(attention=-1.0)
    with pytest.raises(ConfigError, match="beta"):
        LwM(beta=-0.5)
