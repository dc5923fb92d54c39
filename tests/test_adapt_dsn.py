"""Domain Separation Networks (adapt/methods/dsn.py): each loss term, its gradient paths, and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.data import DigitDomain, PairedDomains, TaskTargets
from adapt.losses import GaussianMMD, ScaleInvariantMSE, dann_lambda
from adapt.methods.dsn import DSN, DigitDecoder, dsn_mmd, fresh_copy
from mtl.config import TrainerConfig
from mtl.encoders import build_encoder
from mtl.errors import ConfigError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting

NAMES = ["classification", "difference", "reconstruction", "similarity"]


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Random 28x28 grey images whose mean brightness carries the label (n % 10); ``shift`` moves the domain."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    return (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) / 20 + shift).clamp(0, 1)


def domain(n: int, seed: int, shift: float = 0.0, name: str = "toy") -> DigitDomain:
    return DigitDomain(images(n, seed, shift).float(), torch.arange(n) % 10, name, "train")


def lenet_parts(similarity: str = "dann", **options):
    """A multilenet model with a label head, and a DSN whose private encoders copy its encoder."""
    torch.manual_seed(0)
    encoder = build_encoder("multilenet", dropout=0.0)
    model = MultiTaskModel(encoder, {"label": ClassificationHead(50, 10)})
    objective = DSN(classification_task("label", 10), private_encoder=encoder, similarity=similarity, **options)
    return model, objective


def paired_batch(n: int = 8, shift: float = 0.3) -> dict:
    return {"source": (images(n, 1), torch.arange(n) % 10), "target": images(n, 2, shift)}


def grads(loss: torch.Tensor, params) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True))


def untouched(gradients) -> bool:
    return all(g is None or not g.any() for g in gradients)


def touched(gradients) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in gradients)


# --------------------------------------------------------------------------- difference


class PixelCode(nn.Module):
    """Code = ``size`` pixels of the flattened image starting at ``offset``, times a learnable scale (1)."""

    def __init__(self, size: int = 4, offset: int = 0):
        super().__init__()
        self.size, self.offset = size, offset
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x.flatten(1)[:, self.offset:self.offset + self.size]


def pixel_parts(size: int = 4):
    """Shared code = pixels 0..3, private code = pixels 4..7: images then carry hand-made codes."""
    model = MultiTaskModel(PixelCode(4, 0), {"label": ClassificationHead(4, 10)})
    objective = DSN(classification_task("label", 10), private_encoder=lambda: PixelCode(size, 4), similarity="mmd")
    return model, objective


def coded_images(shared: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(len(shared), 1, 28, 28)
    x.view(len(shared), -1)[:, :4] = shared
    x.view(len(shared), -1)[:, 4:8] = private
    return x


def test_difference_is_zero_for_orthogonal_codes_and_pairs_each_domain_with_itself():
    model, objective = pixel_parts()
    a, b = torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([3.0, 0.0, 1.0, 1.0])
    zero = torch.zeros(4)
    # Source: shared codes live on samples 0, 1 and private codes on samples 2, 3 (both centred), so
    # the columns of H_c and H_p are orthogonal over the batch: H_c^T H_p = 0. The target swaps the
    # samples, so pairing a domain's shared codes with the OTHER domain's private codes would not be 0.
    x_s = coded_images(torch.stack([a, -a, zero, zero]), torch.stack([zero, zero, b, -b]))
    x_t = coded_images(torch.stack([zero, zero, b, -b]), torch.stack([a, -a, zero, zero]))
    batch = {"source": (x_s, torch.arange(4)), "target": x_t}
    losses, _ = objective.losses(model, batch)
    assert losses["difference"].item() == pytest.approx(0.0, abs=1e-6)
    crossed = objective.difference_loss(model.encode(x_s), objective.private["target"](x_t))
    assert crossed.item() > 0.5

    # Private code = shared code on the source: centred, row-normalised rows are u, -u, 0, 0, so
    # ||H^T H||_F^2 = ||H H^T||_F^2 = 4 entries of magnitude 1 -> 4. The target stays orthogonal.
    same = torch.stack([a, -a, zero, zero])
    batch = {"source": (coded_images(same, same), torch.arange(4)), "target": x_t}
    losses, _ = objective.losses(model, batch)
    assert losses["difference"].item() == pytest.approx(4.0, rel=1e-5)


# --------------------------------------------------------------------------- reconstruction


class Offset(nn.Module):
    def __init__(self, decoder: nn.Module, offset: float):
        super().__init__()
        self.decoder, self.offset = decoder, offset

    def forward(self, code):
        return self.decoder(code) + self.offset


def test_reconstruction_is_the_scale_invariant_mse_of_shared_plus_private_and_ignores_an_offset():
    # a linear decoder (no sigmoid): its output follows the code closely, so using the wrong code shows
    model, objective = lenet_parts("mmd", decoder=nn.Sequential(nn.Linear(50, 784), nn.Unflatten(1, (1, 28, 28))))
    batch = paired_batch()
    x_s, x_t = batch["source"][0], batch["target"]
    losses, _ = objective.losses(model, batch)
    si_mse = ScaleInvariantMSE()
    with torch.no_grad():
        z_s, z_t = model.encode(x_s), model.encode(x_t)
        p_s, p_t = objective.private["source"](x_s), objective.private["target"](x_t)
        expected = si_mse(objective.decoder(z_s + p_s), x_s) + si_mse(objective.decoder(z_t + p_t), x_t)
        shared_only = si_mse(objective.decoder(z_s), x_s) + si_mse(objective.decoder(z_t), x_t)
        plain_mse = F.mse_loss(objective.decoder(z_s + p_s), x_s)
    assert losses["reconstruction"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(shared_only.item() - expected.item()) > 1e-3 * expected.item()  # the private code takes part

    objective.decoder = Offset(objective.decoder, 0.3)
    shifted, _ = objective.losses(model, batch)
    with torch.no_grad():
        shifted_mse = F.mse_loss(objective.decoder(z_s + p_s), x_s)
    assert shifted["reconstruction"].item() == pytest.approx(losses["reconstruction"].item(), rel=1e-5)
    assert abs(shifted_mse.item() - plain_mse.item()) > 0.01  # a plain MSE would have moved
    for name in ("classification", "difference", "similarity"):
        assert shifted[name].item() == pytest.approx(losses[name].item(), rel=1e-6)


def test_digit_decoder_gives_images_in_the_unit_range():
    out = DigitDecoder(50)(torch.randn(4, 50) * 10)
    assert out.shape == (4, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert DigitDecoder(50, (3, 28, 28))(torch.zeros(2, 50)).shape == (2, 3, 28, 28)
    assert DigitDecoder(8, (1, 32, 30))(torch.zeros(5, 8)).shape == (5, 1, 32, 30)


# --------------------------------------------------------------------------- similarity


def test_dann_similarity_reverses_the_gradient_into_the_shared_encoder_only():
    model, objective = lenet_parts("dann")
    assert objective.lambda_ == 0.0
    objective.set_progress(0.3)
    lam = dann_lambda(0.3)
    assert objective.lambda_ == pytest.approx(lam)
    assert objective.domain_classifier.reversal.lambda_ == pytest.approx(lam)
    batch = paired_batch()
    losses, z = objective.losses(model, batch)
    # the same loss without the reversal layer: BCE with source = 0, target = 1, per-domain means
    logits = objective.domain_classifier.net(z).squeeze(1)
    n = len(batch["source"][0])
    plain = (F.binary_cross_entropy_with_logits(logits[:n], torch.zeros(n))
             + F.binary_cross_entropy_with_logits(logits[n:], torch.ones(len(logits) - n)))
    assert losses["similarity"].item() == pytest.approx(plain.item(), rel=1e-6)
    weight = model.encoder.conv1.weight
    reversed_grad, = grads(losses["similarity"], [weight])
    plain_grad, = grads(plain, [weight])
    assert plain_grad.abs().sum() > 0
    assert torch.allclose(reversed_grad, -lam * plain_grad, atol=1e-7)
    # the domain classifier itself descends the BCE (its gradient is not reversed)
    head = objective.domain_classifier.net[0].weight
    assert torch.allclose(grads(losses["similarity"], [head])[0], grads(plain, [head])[0], atol=1e-7)
    assert untouched(grads(losses["similarity"], objective.private.parameters()))


def test_dann_similarity_without_schedule_reverses_with_lambda_one():
    _, objective = lenet_parts("dann", schedule=False)
    objective.set_progress(0.0)
    assert objective.domain_classifier.reversal.lambda_ == 1.0


def test_mmd_similarity_is_the_mmd_of_the_shared_codes_and_near_zero_for_one_domain():
    model, objective = lenet_parts("mmd")
    assert not hasattr(objective, "domain_classifier")
    n = 64
    same = {"source": (images(n, 1), torch.arange(n) % 10), "target": images(n, 2)}
    shifted = {"source": (images(n, 1), torch.arange(n) % 10), "target": images(n, 3, shift=0.3)}
    same_losses, _ = objective.losses(model, same)
    shifted_losses, _ = objective.losses(model, shifted)
    with torch.no_grad():
        expected = GaussianMMD()(model.encode(images(n, 1)), model.encode(images(n, 3, shift=0.3)))
    assert shifted_losses["similarity"].item() == pytest.approx(expected.item(), rel=1e-5)
    # two draws of one domain: the unbiased MMD^2 is ~0; a shifted target is far from it
    assert abs(same_losses["similarity"].item()) < 0.03
    assert shifted_losses["similarity"].item() > 10 * abs(same_losses["similarity"].item())
    assert touched(grads(shifted_losses["similarity"], model.encoder.parameters()))
    assert untouched(grads(shifted_losses["similarity"], objective.private.parameters()))
    assert untouched(grads(shifted_losses["similarity"], objective.decoder.parameters()))


# --------------------------------------------------------------------------- gradient paths


def test_private_encoders_get_gradients_only_from_their_own_domain():
    model, objective = lenet_parts("dann")
    objective.set_progress(0.5)
    batch = paired_batch()
    x_s, x_t = batch["source"][0], batch["target"]
    _, z_s, z_t = objective.features(model, x_s, x_t)
    private_s = list(objective.private["source"].parameters())
    private_t = list(objective.private["target"].parameters())
    decoder = list(objective.decoder.parameters())
    for term in objective.separation_losses(z_s, x_s, "source"):  # difference, reconstruction
        assert touched(grads(term, private_s))
        assert untouched(grads(term, private_t))
    for term in objective.separation_losses(z_t, x_t, "target"):
        assert touched(grads(term, private_t))
        assert untouched(grads(term, private_s))
    # the shared decoder learns from both domains' reconstructions
    assert touched(grads(objective.separation_losses(z_s, x_s, "source")[1], decoder))
    assert touched(grads(objective.separation_losses(z_t, x_t, "target")[1], decoder))
    # the label loss and the similarity never reach the private encoders
    losses, _ = objective.losses(model, batch)
    for name in ("classification", "similarity"):
        assert untouched(grads(losses[name], private_s + private_t))
    # the full difference / reconstruction losses are the sums of the two domains' terms
    parts = [objective.separation_losses(z_s, x_s, "source"), objective.separation_losses(z_t, x_t, "target")]
    assert losses["difference"].item() == pytest.approx((parts[0][0] + parts[1][0]).item(), rel=1e-6)
    assert losses["reconstruction"].item() == pytest.approx((parts[0][1] + parts[1][1]).item(), rel=1e-6)


def test_private_encoders_copy_the_shared_architecture_with_fresh_weights():
    torch.manual_seed(0)
    encoder = build_encoder("multilenet", dropout=0.0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    objective = DSN(classification_task("label", 10), private_encoder=encoder)
    assert objective.code_size == 50
    for name in ("source", "target"):
        private = objective.private[name]
        assert type(private) is type(encoder)
        assert [p.shape for p in private.parameters()] == [p.shape for p in encoder.parameters()]
        assert not torch.equal(private.conv1.weight, encoder.conv1.weight)
    assert not torch.equal(objective.private["source"].fc.weight, objective.private["target"].fc.weight)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the original is untouched
    ids = {id(p) for p in encoder.parameters()}
    assert not any(id(p) in ids for p in objective.private.parameters())


# --------------------------------------------------------------------------- bad input


def test_shared_and_private_code_sizes_must_match():
    model, objective = pixel_parts(size=6)
    batch = {"source": (torch.rand(4, 1, 28, 28), torch.arange(4)), "target": torch.rand(4, 1, 28, 28)}
    with pytest.raises(ConfigError, match=r"shared code has 4 features but the private codes have 6"):
        objective.losses(model, batch)


def test_unknown_similarity_and_other_bad_options():
    task = classification_task("label", 10)
    encoder = build_encoder("multilenet", dropout=0.0)
    with pytest.raises(ConfigError, match=r"unknown DSN similarity 'coral'; choose one of: dann, mmd"):
        DSN(task, private_encoder=encoder, similarity="coral")
    with pytest.raises(ConfigError, match="DSN needs private_encoder"):
        DSN(task)
    with pytest.raises(ConfigError, match="returned the same module"):
        DSN(task, private_encoder=lambda: encoder)
    with pytest.raises(ConfigError, match="must return an nn.Module"):
        DSN(task, private_encoder=lambda: "multilenet")
    with pytest.raises(ConfigError, match="has no reset_parameters"):
        DSN(task, private_encoder=PixelCode())
    with pytest.raises(ConfigError, match=r"image_shape must be \(channels, height, width\)"):
        DSN(task, private_encoder=encoder, image_shape=(28, 28))
    with pytest.raises(ConfigError, match="multilenet expects 28x28 inputs"):
        DSN(task, private_encoder=encoder, image_shape=(1, 32, 32))
    with pytest.raises(ConfigError, match=r"cannot encode images of shape \(3, 28, 28\)"):
        DSN(task, private_encoder=encoder, image_shape=(3, 28, 28))
    with pytest.raises(ConfigError, match="mmd_options only apply to similarity='mmd'"):
        DSN(task, private_encoder=encoder, mmd_options={"estimator": "linear"})
    with pytest.raises(ConfigError, match="dsn_mmd fixes similarity='mmd'"):
        dsn_mmd(task, private_encoder=encoder, similarity="dann")
    assert dsn_mmd(task, private_encoder=encoder, mmd_options={"estimator": "linear"}).mmd.estimator == "linear"


def test_batches_that_do_not_fit_the_objective():
    model, objective = lenet_parts("mmd")
    grey = {"source": (torch.rand(4, 1, 28, 28), torch.arange(4)), "target": torch.rand(4, 3, 28, 28)}
    with pytest.raises(ConfigError, match=r"built for images of shape \(1, 28, 28\).*target batch has \(3, 28, 28\)"):
        objective.losses(model, grey)
    # a private encoder that is the model's own encoder
    encoder = model.encoder
    made = iter([encoder, build_encoder("multilenet", dropout=0.0)])
    sharing = DSN(classification_task("label", 10), private_encoder=lambda: next(made))
    with pytest.raises(ConfigError, match="shares parameters with the model's"):
        sharing.losses(model, paired_batch())


def test_fresh_copy_reinitialises_every_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    copy_ = fresh_copy(net)
    assert not torch.equal(copy_[0].weight, net[0].weight)
    assert not torch.equal(copy_[2][0].weight, net[2][0].weight)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("similarity", ["dann", "mmd"])
def test_dsn_trains_one_epoch_through_the_trainer(tmp_path, similarity):
    label_task = classification_task("label", 10)
    torch.manual_seed(0)
    encoder = build_encoder("multilenet", dropout=0.0)
    objective = DSN(label_task, private_encoder=encoder, similarity=similarity)
    model = MultiTaskModel(encoder, {"label": ClassificationHead(50, 10)})
    weights = {"classification": 1.0, "difference": 0.05, "reconstruction": 0.1, "similarity": 0.25}
    weighting = build_weighting("static", objective.loss_names, weights=weights)
    config = TrainerConfig(epochs=1, batch_size=16, lr=1e-3, cpu=True, progress=False, tensorboard=False,
                           log_every=1)
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    trainer = Trainer(model, [label_task], weighting, PairedDomains(domain(32, 0), domain(24, 1, 0.2, "shifted")),
                      TaskTargets(domain(10, 2, 0.2), "label"), config, tmp_path, objective=objective)
    history = trainer.fit()
    assert history["losses"] == NAMES == trainer.objective.loss_names
    assert history["tasks"] == ["label"]
    assert len(history["steps"]) == 2  # 32 pairs (the shorter target is cycled) / batch 16
    for step in history["steps"]:
        assert set(step["loss"]) == set(NAMES)
        assert all(math.isfinite(v) for v in step["loss"].values())
        assert step["loss"]["difference"] >= 0 and step["loss"]["reconstruction"] >= 0
    assert 0.0 <= history["epochs"][-1]["eval"]["label"]["accuracy"] <= 1.0
    # the objective's parts trained with the model's optimizer and are in the checkpoint
    after = trainer.objective.state_dict()
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k in after if not torch.equal(before[k], after[k].cpu())}
    assert {"private.source", "private.target"} <= moved
    assert any(k.startswith("decoder.") and not torch.equal(before[k], after[k].cpu()) for k in after)
    saved = torch.load(trainer.last_checkpoint, weights_only=True)["objective"]
    assert set(saved) == set(after)
    if similarity == "dann":
        assert "domain_classifier.net.0.weight" in saved
        assert trainer.objective.domain_classifier.reversal.lambda_ == pytest.approx(dann_lambda(1.0))
    else:
        assert not any(k.startswith("domain_classifier") for k in saved)
