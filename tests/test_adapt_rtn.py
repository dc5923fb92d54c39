"""RTN (Long et al. 2016): f_S = f_T + Delta f, which losses reach which parts, the fused feature, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adapt.data import DigitDomain, PairedDomains, TaskTargets
from adapt.losses import GaussianMMD, dann_lr_factor
from adapt.methods.rtn import PAPER_WEIGHTS, RTN, ResidualBlock, fuse, split_head
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting


def domain(n: int, seed: int, shift: float = 0.0, name: str = "toy") -> DigitDomain:
    """Random 28x28 grey images whose brightness carries the label; ``shift`` moves the domain."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) / 20 + shift).clamp(0, 1)
    return DigitDomain(images.float(), labels, name, "train")


def model(hidden: int | None = 50, classes: int = 10) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(build_encoder("multilenet", dropout=0.0), {"label": ClassificationHead(50, classes, hidden)})


def rtn(**options) -> RTN:
    torch.manual_seed(1)
    return RTN(classification_task("label", 10), num_classes=10, **options)


def batch(n_s: int = 6, n_t: int = 5) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"source": (torch.rand(n_s, 1, 28, 28, generator=g), torch.arange(n_s) % 10),
            "target": torch.rand(n_t, 1, 28, 28, generator=g) + 0.2}


def grads(loss, params) -> list[float]:
    """The L1 norm of d loss / d p for each parameter (0 where the loss does not depend on it)."""
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else g.abs().sum().item() for g in gs]


# ----------------------------------------------------------------- the residual block and f_S


def test_source_classifier_is_target_classifier_plus_residual_on_a_hand_example():
    block = ResidualBlock(3)
    with torch.no_grad():  # fc1 = I with bias -1, fc2 = 2 I with bias 0.5
        block.fc1.weight.copy_(torch.eye(3))
        block.fc1.bias.fill_(-1.0)
        block.fc2.weight.copy_(2 * torch.eye(3))
        block.fc2.bias.fill_(0.5)
    objective = RTN(classification_task("label", 3), num_classes=3)
    objective.residual = block
    f_t = torch.tensor([[2.0, 0.5, -1.0]])
    # fc1: [1, -0.5, -2] -> ReLU: [1, 0, 0] -> fc2: [2.5, 0.5, 0.5]; f_S = f_T + that
    assert torch.allclose(block(f_t), torch.tensor([[2.5, 0.5, 0.5]]))
    assert torch.allclose(objective.source_logits(f_t), torch.tensor([[4.5, 1.0, -0.5]]))


def test_source_logits_equal_target_logits_plus_the_block_exactly():
    objective = rtn()
    f_t = torch.randn(7, 10)
    delta = objective.residual.fc2(torch.relu(objective.residual.fc1(f_t)))
    assert torch.equal(objective.source_logits(f_t), f_t + delta)
    assert delta.abs().max() > 0  # the authors' N(0, 0.01^2) start: small, not zero


def test_default_initialisation_is_the_authors_small_gaussian():
    block = ResidualBlock(10)
    for layer in (block.fc1, block.fc2):
        assert layer.weight.shape == (10, 10)
        assert 0.007 < layer.weight.std().item() < 0.013
        assert torch.equal(layer.bias, torch.zeros(10))
    assert ResidualBlock(10, hidden=4).fc1.weight.shape == (4, 10)


def test_zero_initialised_block_starts_with_f_s_equal_to_f_t_and_still_learns():
    objective = rtn(zero_init=True)
    f_t = torch.randn(4, 10)
    assert torch.equal(objective.source_logits(f_t), f_t)
    # one SGD step on the source loss moves fc2, so f_S departs from f_T
    loss = F.cross_entropy(objective.source_logits(f_t), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert objective.residual.fc2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in objective.residual.parameters():
            p -= 0.5 * p.grad
    assert not torch.allclose(objective.source_logits(f_t), f_t)


# ----------------------------------------------------------------- the losses and their gradients


def test_losses_follow_the_formulas():
    net, objective = model(), rtn()
    with torch.no_grad():  # a residual large enough that CE(f_S) and CE(f_T) are far apart
        objective.residual.fc2.bias.copy_(torch.linspace(-2.0, 2.0, 10))
    b = batch()
    losses, z = objective.losses(net, b)
    assert list(losses) == ["classification", "entropy", "mmd"] == objective.loss_names
    x_s, y_s = b["source"]
    bottleneck = torch.relu(net.heads["label"].net[0](net.encode(torch.cat([x_s, b["target"]]))))
    f_t = net.heads["label"].net[-1](bottleneck)
    f_s = f_t[:6] + objective.residual(f_t[:6])
    # classification is the cross-entropy of f_S, not of f_T
    assert losses["classification"].item() == pytest.approx(F.cross_entropy(f_s, y_s).item(), rel=1e-5)
    assert abs(losses["classification"].item() - F.cross_entropy(f_t[:6], y_s).item()) > 0.1
    # entropy: mean of -sum p log p of f_T on the target, positive (it is minimised)
    p = torch.softmax(f_t[6:], 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert losses["entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert 0 < losses["entropy"].item() <= math.log(10) + 1e-6
    # mmd on the flattened tensor product bottleneck (x) f_T logits
    fused = (bottleneck.unsqueeze(2) * f_t.unsqueeze(1)).flatten(1)
    assert fused.shape == (11, 50 * 10)
    assert losses["mmd"].item() == pytest.approx(GaussianMMD()(fused[:6], fused[6:]).item(), rel=1e-4, abs=1e-7)
    assert z.shape == (11, 50)


def test_classification_reaches_head_and_block_while_entropy_and_mmd_leave_the_block_alone():
    net, objective = model(), rtn()
    losses, _ = objective.losses(net, batch())
    head = list(net.heads["label"].parameters())
    block = list(objective.residual.parameters())
    encoder = list(net.encoder.parameters())
    classification = grads(losses["classification"], head + block + encoder)
    assert all(g > 0 for g in classification), "the source loss must train f_T, Delta f and the encoder"
    for name in ("entropy", "mmd"):
        g = grads(losses[name], head + block + encoder)
        assert all(v > 0 for v in g[: len(head)]), f"{name} must reach the target classifier"
        assert g[len(head): len(head) + len(block)] == [0.0] * len(block), f"{name} must not touch Delta f"
        assert all(v > 0 for v in g[len(head) + len(block):]), f"{name} must reach the encoder"


# ----------------------------------------------------------------- the fused feature


def test_fused_feature_is_the_flattened_tensor_product_on_a_hand_example():
    features = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0]])
    # softmax of row 0: [0.25, 0.75]; of row 1: [e^3, 1] / (e^3 + 1)
    q = 1 / (1 + math.exp(-3))
    expected_softmax = torch.tensor([[0.25, 0.75, 0.5, 1.5], [0.0, 0.0, -q, -(1 - q)]])
    expected_logits = torch.tensor([[0.0, math.log(3.0), 0.0, 2 * math.log(3.0)], [0.0, 0.0, -1.0, 2.0]])
    assert fuse(features, logits, "softmax").shape == (2, 2 * 2)
    assert torch.allclose(fuse(features, logits, "softmax"), expected_softmax, atol=1e-6)
    assert torch.allclose(fuse(features, logits, "logits"), expected_logits, atol=1e-6)
    wide = fuse(torch.randn(3, 5), torch.randn(3, 4))
    assert wide.shape == (3, 20)


def test_split_head_gives_the_bottleneck_the_classifier_layer_reads():
    z = torch.randn(4, 50)
    hidden_head = ClassificationHead(50, 10, hidden=8)
    bottleneck, logits = split_head(hidden_head, z)
    assert bottleneck.shape == (4, 8) and (bottleneck >= 0).all()  # after the hidden layer's ReLU
    assert torch.equal(logits, hidden_head(z))
    plain_head = ClassificationHead(50, 10)
    bottleneck, logits = split_head(plain_head, z)
    assert torch.equal(bottleneck, z) and torch.equal(logits, plain_head(z))
    other = nn.Linear(50, 10)  # a head without .net: called whole, its input is the bottleneck
    bottleneck, logits = split_head(other, z)
    assert torch.equal(bottleneck, z) and torch.equal(logits, other(z))


def test_softmax_fusion_changes_only_the_mmd():
    net = model()
    a, _ = rtn().losses(net, batch())
    b, _ = rtn(fuse_mode="softmax").losses(net, batch())
    assert a["classification"].item() == b["classification"].item()
    assert a["entropy"].item() == b["entropy"].item()
    assert a["mmd"].item() != b["mmd"].item()


# ----------------------------------------------------------------- bad input


def test_a_residual_block_that_does_not_fit_the_label_head_is_refused():
    objective = RTN(classification_task("label", 5), num_classes=5)
    with pytest.raises(ConfigError, match=r"built for 5 classes, but the label head gives logits of shape \(11, 10\)"):
        objective.losses(model(), batch())
    with pytest.raises(ConfigError, match="built for 5 classes"):
        objective.source_logits(torch.zeros(2, 7))


@pytest.mark.parametrize("options, message", [
    ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
    ({"num_classes": 2.5}, "num_classes must be an integer >= 2, got 2.5"),
    ({"num_classes": "10"}, "num_classes must be an integer >= 2, got '10'"),
    ({"num_classes": 10, "residual_hidden": 0}, "residual_hidden must be an integer >= 1, got 0"),
    ({"num_classes": 10, "init_std": -0.1}, "init_std must be a finite number >= 0, got -0.1"),
    ({"num_classes": 10, "fuse_mode": "concat"}, "unknown fuse_mode 'concat' for RTN; choose one of: logits, softmax"),
    ({"num_classes": 10, "estimator": "cubic"}, "unknown MMD estimator 'cubic'"),
])
def test_bad_options_raise_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        RTN(classification_task("label", 10), **options)


def test_model_without_a_label_head_is_refused():
    net = MultiTaskModel(build_encoder("multilenet"), {"digits": ClassificationHead(50, 10)})
    with pytest.raises(ConfigError, match=r"needs a model with head\(s\) \['label'\]"):
        rtn().losses(net, batch())


# ----------------------------------------------------------------- training through the Trainer


def trainer(run_dir, epochs: int = 1, trainer_cls=Trainer, pairs: int = 64, **config) -> Trainer:
    label_task = classification_task("label", 10)
    objective = rtn()
    weighting = build_weighting("static", objective.loss_names, weights=PAPER_WEIGHTS)
    cfg = TrainerConfig(epochs=epochs, batch_size=16, lr=1e-3, cpu=True, progress=False, tensorboard=False,
                        log_every=1, **config)
    paired = PairedDomains(domain(pairs, 0), domain(pairs * 3 // 4, 1, shift=0.2, name="shifted"))
    return trainer_cls(model(), [label_task], weighting, paired, TaskTargets(domain(20, 2, 0.2), "label"), cfg,
                   run_dir, objective=objective)


def test_rtn_trains_one_epoch_end_to_end(tmp_path):
    t = trainer(tmp_path)
    block_before = [p.detach().clone() for p in t.objective.residual.parameters()]
    history = t.fit()
    assert history["losses"] == ["classification", "entropy", "mmd"]
    assert history["tasks"] == ["label"]
    assert len(history["steps"]) == 4  # 64 pairs / batch 16
    for step in history["steps"]:
        assert all(math.isfinite(v) for v in step["loss"].values())
        assert step["loss"]["entropy"] > 0
    assert 0.0 <= history["epochs"][-1]["eval"]["label"]["accuracy"] <= 1.0
    # the residual block lives in the objective and trains with the model's optimizer
    moved = [not torch.equal(a, b) for a, b in zip(block_before, t.objective.residual.parameters())]
    assert all(moved)
    # the paper's annealing mu_0 / (1 + 10 p)^0.75: the epoch's last step ran at p = 1
    assert history["epochs"][0]["lr"] == pytest.approx(1e-3 * dann_lr_factor(1.0))


class Killed(Exception):
    """Stands in for the process dying mid-run."""


class KilledAtStep3(Trainer):
    def train_step(self, batch):
        if self.progress.step + 1 == 3:
            raise Killed
        return super().train_step(batch)


def test_rtn_resumes_with_its_residual_block(tmp_path):
    """Killed at step 3 of 4 (checkpoint at step 2) and resumed: the same residual block as an unbroken run."""
    reference = trainer(tmp_path / "reference", epochs=2, pairs=32)
    reference.fit()
    with pytest.raises(Killed):
        trainer(tmp_path / "run", epochs=2, pairs=32, trainer_cls=KilledAtStep3, checkpoint_every=2).fit()
    resumed = trainer(tmp_path / "run", epochs=2, pairs=32, checkpoint_every=2)
    resumed.fit(resume=tmp_path / "run")
    for a, b in zip(reference.objective.residual.parameters(), resumed.objective.residual.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(reference.objective.residual.fc2.weight, rtn().residual.fc2.weight)
