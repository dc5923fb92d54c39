"""Cross-stitch networks and model patches: formulas, independence, shapes, training, transfer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtl.architectures import (
    DEFAULT_UNIT_LR_SCALE,
    CrossStitchEncoder,
    CrossStitchUnit,
    PatchedEncoder,
    build_cross_stitch_encoder,
    build_patched_encoder,
    encoder_stages,
    parameter_report,
)
from mtl.config import TrainerConfig
from mtl.encoders import MultiLeNetEncoder, build_encoder
from mtl.errors import ConfigError
from mtl.heads import ClassificationHead
from mtl.model import MultiTaskModel
from mtl.optim import build_optimizer
from mtl.tasks import classification_task
from mtl.trainer import Trainer
from mtl.weighting import build_weighting

from conftest import TwoTaskDigits


def _set_alphas(encoder: CrossStitchEncoder, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        for unit in encoder.units:
            unit.alpha.copy_(matrix.expand_as(unit.alpha))


# ----- cross-stitch ------------------------------------------------------------------------------
def test_units_start_near_the_identity_with_rows_summing_to_one():
    enc = build_cross_stitch_encoder("multilenet", tasks=["left", "right"], in_channels=1)
    assert enc.out_features == 50 and enc.stage_names == ["conv1", "conv2", "fc"]
    assert [tuple(a.shape) for a in enc.alphas()] == [(10, 2, 2), (20, 2, 2), (50, 2, 2)]  # one T x T per channel
    for alpha in enc.alphas():
        assert torch.equal(alpha, torch.tensor([[0.9, 0.1], [0.1, 0.9]]).expand_as(alpha))

    three = CrossStitchUnit(3, channels=4)
    expected = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    assert torch.allclose(three.alpha, expected.expand(4, 3, 3))
    custom = CrossStitchUnit(2, channels=3, self_weight=0.7, other_weight=0.2, per_channel=False)
    assert torch.allclose(custom.alpha, torch.tensor([[[0.7, 0.2], [0.2, 0.7]]]))


def test_hand_set_alpha_mixes_by_the_formula():
    unit = CrossStitchUnit(2, channels=2)
    with torch.no_grad():  # alpha[c, t, s]: how much of column s's channel c goes to column t
        unit.alpha.copy_(torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, -1.0], [0.0, 2.0]]]))
    x_a, x_b = torch.tensor([[1.0, 10.0]]), torch.tensor([[100.0, 1000.0]])
    out_a, out_b = unit([x_a, x_b])
    # channel 0: a = 1*1 + 2*100, b = 3*1 + 4*100; channel 1: a = 0.5*10 - 1*1000, b = 0*10 + 2*1000
    assert torch.equal(out_a, torch.tensor([[201.0, -995.0]]))
    assert torch.equal(out_b, torch.tensor([[403.0, 2000.0]]))
    maps_a, maps_b = unit([x_a.view(1, 2, 1, 1).expand(1, 2, 2, 3), x_b.view(1, 2, 1, 1).expand(1, 2, 2, 3)])
    assert torch.equal(maps_a, torch.tensor([201.0, -995.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3))
    assert torch.equal(maps_b, torch.tensor([403.0, 2000.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3))

    # three columns on feature maps: x'_t[c] = sum_s alpha[c, t, s] x_s[c], element by element
    torch.manual_seed(0)
    unit3 = CrossStitchUnit(3, channels=4)
    with torch.no_grad():
        unit3.alpha.normal_()
    xs = [torch.randn(2, 4, 3, 5) for _ in range(3)]
    outs = unit3(xs)
    for t in range(3):
        for c in range(4):
            expected = sum(unit3.alpha[c, t, s] * xs[s][:, c] for s in range(3))
            assert torch.allclose(outs[t][:, c], expected, atol=1e-6)

    # through the encoder: both columns see the same input, so column t gets (row sum of alpha[c, t]) * x
    enc = CrossStitchEncoder({"a": [nn.Identity()], "b": [nn.Identity()]}, channels=[2])
    with torch.no_grad():
        enc.units[0].alpha.copy_(unit.alpha)
    out = enc(torch.tensor([[1.0, 2.0]]))
    assert torch.equal(out["a"], torch.tensor([[3.0, -1.0]])) and torch.equal(out["b"], torch.tensor([[7.0, 4.0]]))


def test_identity_alpha_makes_columns_independent_single_task_networks():
    torch.manual_seed(0)
    plain_a, plain_b = MultiLeNetEncoder(in_channels=1), MultiLeNetEncoder(in_channels=1)
    stages_a, names = encoder_stages(copy.deepcopy(plain_a))
    stages_b, _ = encoder_stages(copy.deepcopy(plain_b))
    enc = CrossStitchEncoder({"a": stages_a, "b": stages_b}, input_shape=(1, 28, 28), stage_names=names)
    _set_alphas(enc, torch.eye(2))
    enc.eval(), plain_a.eval(), plain_b.eval()
    x = torch.randn(4, 1, 28, 28)
    out = enc(x)
    assert torch.allclose(out["a"], plain_a(x), atol=1e-6) and torch.allclose(out["b"], plain_b(x), atol=1e-6)

    out["a"].square().sum().backward()
    grads_a = [p.grad for p in enc.columns["a"].parameters()]
    grads_b = [p.grad for p in enc.columns["b"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads_a)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads_b)  # nothing reaches column b

    # and the default near-identity init does mix: column b's weights then change column a's output
    enc2 = CrossStitchEncoder({"a": encoder_stages(copy.deepcopy(plain_a))[0],
                               "b": encoder_stages(copy.deepcopy(plain_b))[0]}, input_shape=(1, 28, 28)).eval()
    assert not torch.allclose(enc2(x)["a"], plain_a(x), atol=1e-4)


def test_units_train_with_their_own_learning_rate_scale():
    assert DEFAULT_UNIT_LR_SCALE == 1e3  # Misra et al. 2016, Sec. 4.1 / Table 3
    enc = build_cross_stitch_encoder("multilenet", tasks=["a", "b"])
    model = MultiTaskModel(enc, {t: ClassificationHead(50, 10) for t in "ab"})
    groups = {g["lr_scale"]: {id(p) for p in g["params"]} for g in model.parameter_groups()}
    assert set(groups) == {1.0, 1000.0}
    assert groups[1000.0] == {id(u.alpha) for u in enc.units}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    opt = build_optimizer(model.parameter_groups(), TrainerConfig(lr=1e-3))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 1.0])

    enc10 = build_cross_stitch_encoder("multilenet", tasks=["a", "b"], unit_lr_scale=10)
    groups10 = MultiTaskModel(enc10, {t: nn.Linear(50, 2) for t in "ab"}).parameter_groups()
    assert sorted(g["lr_scale"] for g in groups10) == [1.0, 10.0]


def test_columns_with_different_stage_shapes_are_refused():
    with pytest.raises(ConfigError, match=r"cross-stitch columns whose stage shapes differ.*stage 0 \('conv'\)"
                                          r".*'a': \(2, 4, 6, 6\).*'b': \(2, 5, 6, 6\)"):
        CrossStitchEncoder({"a": [nn.Conv2d(1, 4, 3)], "b": [nn.Conv2d(1, 5, 3)]}, input_shape=(1, 8, 8),
                           stage_names=["conv"])
    # found at run time too, when the units were sized by hand and no probe ran
    enc = CrossStitchEncoder({"a": [nn.Flatten(), nn.Identity()], "b": [nn.Identity(), nn.Flatten()]},
                             channels=[6], stitch_last=False)
    with pytest.raises(ConfigError, match=r"stage shapes differ: after stage 0.*'a': \(1, 6\).*'b': \(1, 2, 3\)"):
        enc(torch.randn(1, 2, 3))
    with pytest.raises(ConfigError, match="share parameters"):
        shared = nn.Linear(3, 3)
        CrossStitchEncoder({"a": [shared], "b": [shared]}, channels=[3])
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        build_cross_stitch_encoder("multilenet", tasks=["a"])
    with pytest.raises(ConfigError, match="input_shape"):
        CrossStitchEncoder(lambda: [nn.Linear(3, 3)], tasks=["a", "b"])
    with pytest.raises(ConfigError, match="knows 'multilenet'"):
        build_cross_stitch_encoder("vgg16", tasks=["a", "b"])
    with pytest.raises(ConfigError, match="cannot cut a SmpEncoder"):
        build_cross_stitch_encoder("smp:mobilenet_v2", tasks=["a", "b"])
    with pytest.raises(ConfigError, match="output_stride is an option of smp encoders"):
        build_cross_stitch_encoder("resnet18", tasks=["a", "b"], output_stride=16)


def test_dense_cross_stitch_columns_return_the_encoders_feature_pyramid():
    """With identity units each column computes exactly what the smp encoder it was cut from computes."""
    torch.manual_seed(0)
    encoder = build_cross_stitch_encoder("smp:resnet18", ["a", "b"], output_stride=16, self_weight=1.0,
                                         other_weight=0.0).eval()
    plain = build_encoder("smp:resnet18", output_stride=16).eval()
    stem, layer1, layer2, layer3, layer4 = encoder.columns["a"]
    for name, module in [("conv1", stem.conv1), ("bn1", stem.bn1), ("layer1", layer1.layer1), ("layer2", layer2),
                         ("layer3", layer3), ("layer4", layer4)]:
        getattr(plain.encoder, name).load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 48, 64)
    expected = plain(x)
    got = encoder(x, ["a"])["a"]
    assert encoder.out_channels == plain.out_channels and encoder.output_stride == 16
    assert [f.shape for f in got] == [f.shape for f in expected]
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_forward_runs_every_column_but_returns_only_the_asked_tasks():
    enc = build_cross_stitch_encoder("multilenet", tasks=["a", "b", "c"])
    calls = []
    for t in "abc":
        enc.columns[t][0].register_forward_hook(lambda m, i, o, t=t: calls.append(t))
    model = MultiTaskModel(enc, {t: ClassificationHead(50, 10) for t in "abc"})
    out = model(torch.randn(2, 1, 28, 28), tasks=["b"])
    assert list(out) == ["b"] and out["b"].shape == (2, 10)
    assert sorted(calls) == ["a", "b", "c"]
    assert list(enc(torch.randn(2, 1, 28, 28), ["c", "a"])) == ["c", "a"]
    with pytest.raises(ConfigError, match="unknown task"):
        enc(torch.randn(2, 1, 28, 28), ["z"])
    with pytest.raises(ConfigError, match="28x28"):
        enc(torch.randn(2, 1, 32, 32))


def test_resnet18_columns_keep_the_plain_encoders_output_size():
    enc = build_cross_stitch_encoder("resnet18", tasks=["a", "b"], in_channels=1)
    assert enc.out_features == 512 and enc.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert [u.channels for u in enc.units] == [64, 64, 128, 256, 512, 512]
    # same_init: the columns start from one set of weights
    assert all(torch.equal(p, q) for p, q in zip(enc.columns["a"].parameters(), enc.columns["b"].parameters()))
    out = enc(torch.randn(2, 1, 32, 32))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (2, 512), "b": (2, 512)}


def test_cross_stitch_model_learns_both_tasks_with_the_trainer(tmp_path):
    torch.manual_seed(0)
    # The paper's 10^3 unit scale was tuned for SGD; with Adam it moves each alpha by ~3 per step here
    # and diverges, so this run uses a scale of 10.
    enc = build_cross_stitch_encoder("multilenet", tasks=["a", "b"], in_channels=1, unit_lr_scale=10)
    model = MultiTaskModel(enc, {t: ClassificationHead(50, 10, hidden=50, dropout=0.5) for t in "ab"})
    tasks = [classification_task(t, 10) for t in "ab"]
    cfg = TrainerConfig(epochs=4, batch_size=16, lr=3e-3, progress=False, tensorboard=False)
    trainer = Trainer(model, tasks, build_weighting("equal", tasks), TwoTaskDigits(320, seed=1),
                      TwoTaskDigits(100, seed=2), cfg, tmp_path)
    alphas_before = enc.alphas()
    history = trainer.fit()
    first, last = history["epochs"][0], history["epochs"][-1]
    assert last["train_loss"]["a"] < first["train_loss"]["a"] and last["train_loss"]["b"] < first["train_loss"]["b"]
    # 10 classes: chance is 10%
    assert last["eval"]["a"]["accuracy"] >= 0.6 and last["eval"]["b"]["accuracy"] >= 0.6
    assert not torch.equal(alphas_before[0], enc.alphas()[0])  # the units learned too


# ----- model patches -----------------------------------------------------------------------------
def tiny_net() -> nn.Sequential:
    """conv 1->4 (36) | BN(4) (8) | depthwise 3x3 (36) | BN(4) (8) | pointwise 4->8 (32 + 8) | pool: 128 params."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


@pytest.mark.parametrize("patch, shared, per_task", [("scale_bias", 36 + 36 + 40, 8 + 8),
                                                     ("depthwise", 36 + 8 + 8 + 40, 36),
                                                     ("both", 36 + 40, 8 + 8 + 36)])
def test_parameter_counts_match_the_hand_computed_numbers(patch, shared, per_task):
    torch.manual_seed(0)
    enc = PatchedEncoder(tiny_net(), ["a", "b"], patch=patch)
    assert enc.shared_parameter_count() == shared
    assert enc.trainable_parameters_per_task() == {"a": per_task, "b": per_task}
    model = MultiTaskModel(enc, {"a": nn.Linear(8, 3), "b": nn.Linear(8, 5)})
    report = parameter_report(model)
    assert report["shared"] == shared
    assert report["tasks"] == {"a": {"patch": per_task, "head": 27, "total": per_task + 27},
                               "b": {"patch": per_task, "head": 45, "total": per_task + 45}}
    assert report["total"] == shared + 2 * per_task + 27 + 45 == sum(p.numel() for p in model.parameters())
    assert report["separate_models"] == 2 * shared + 2 * per_task + 27 + 45
    enc.add_task("c", init_from="a")
    assert enc.trainable_parameters_per_task()["c"] == per_task and enc.shared_parameter_count() == shared


def test_each_task_keeps_its_own_batchnorm_statistics():
    torch.manual_seed(0)
    enc = PatchedEncoder(tiny_net(), ["a", "b"], patch="scale_bias").train()
    torch.manual_seed(1)
    x_a = torch.randn(16, 1, 6, 6)
    x_b = 3.0 * torch.randn(16, 1, 6, 6) + 2.0  # task b's data: another scale and offset
    torch.manual_seed(0)
    single_a = tiny_net().train()  # a plain network with the same weights, fed task a's data only
    for _ in range(5):
        enc(x_a, ["a"])
        enc(x_b, ["b"])
        single_a(x_a)
    bn_a = [layer.patches["a"] for layer in enc.patched_layers()]
    bn_b = [layer.patches["b"] for layer in enc.patched_layers()]
    # the first BatchNorm sees each task's raw data through the shared conv: clearly other statistics
    assert (bn_a[0].running_mean - bn_b[0].running_mean).abs().max() > 0.2
    assert (bn_a[0].running_var - bn_b[0].running_var).abs().min() > 0.5
    assert not torch.equal(bn_a[1].running_var, bn_b[1].running_var)  # the second sees normalised data
    assert all(a.num_batches_tracked == b.num_batches_tracked == 5 for a, b in zip(bn_a, bn_b))
    plain_bns = [m for m in single_a if isinstance(m, nn.BatchNorm2d)]
    for a, plain in zip(bn_a, plain_bns):
        assert torch.allclose(a.running_mean, plain.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, plain.running_var, atol=1e-6)


def test_tasks_differ_only_through_their_patches():
    torch.manual_seed(0)
    enc = PatchedEncoder(tiny_net(), ["a", "b"], patch="both")
    model = MultiTaskModel(enc, {"a": nn.Linear(8, 3), "b": nn.Linear(8, 3)})
    x = torch.randn(8, 1, 6, 6)
    enc.eval()
    same = enc(x)
    assert torch.equal(same["a"], same["b"])  # patches start as copies of the shared layers

    # multi-task training with different targets: shared weights and both patches move
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ya, yb = torch.randint(3, (8,)), torch.randint(3, (8,))
    model.train()
    for _ in range(5):
        out = model(x)
        loss = F.cross_entropy(out["a"], ya) + F.cross_entropy(out["b"], yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    trained = enc(x)
    assert not torch.allclose(trained["a"], trained["b"])
    # swap task a's patch into task b: b then computes exactly what a computes
    for layer in enc.patched_layers():
        layer.patches["b"].load_state_dict(layer.patches["a"].state_dict())
    swapped = enc(x)
    assert torch.equal(swapped["a"], trained["a"]) and torch.equal(swapped["b"], trained["a"])


def test_a_patch_type_the_network_lacks_is_refused():
    with pytest.raises(ConfigError, match=r"'depthwise'.*groups == in_channels == out_channels.*ResNet"):
        PatchedEncoder(build_encoder("resnet18"), ["a", "b"], patch="depthwise")
    with pytest.raises(ConfigError, match=r"'depthwise'.*ResNet"):
        PatchedEncoder(build_encoder("resnet18"), ["a", "b"], patch="both")
    with pytest.raises(ConfigError, match=r"'scale_bias'.*BatchNorm.*MultiLeNetEncoder"):
        PatchedEncoder(build_encoder("multilenet"), ["a", "b"], patch="scale_bias")
    with pytest.raises(ConfigError, match="unknown patch type 'lora'"):
        PatchedEncoder(tiny_net(), ["a"], patch="lora")
    enc = PatchedEncoder(build_encoder("resnet18"), ["a", "b"], patch="scale_bias")
    assert enc.out_features == 512 and len(enc.patched_layers()) == 20  # every BatchNorm of a ResNet-18


@pytest.mark.parametrize("patch", ["depthwise", "both"])
def test_transfer_mode_trains_only_the_new_patch_and_head(patch):
    torch.manual_seed(0)
    enc = PatchedEncoder(tiny_net(), ["a"], patch=patch)
    model = MultiTaskModel(enc, {"a": nn.Linear(8, 3)})
    enc.add_task("c", init_from="a")
    model.add_head("c", nn.Linear(8, 3))
    enc.freeze_shared(keep_tasks=["c"])
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model.parameter_groups(), TrainerConfig(optimizer="adamw", lr=0.1, weight_decay=0.1))
    model.train()
    assert not any(m.training for m in enc._shared_modules() if isinstance(m, nn.BatchNorm2d))
    out = model(torch.randn(8, 1, 6, 6), tasks=["c"])
    F.cross_entropy(out["c"], torch.randint(3, (8,))).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    private_c = {k for k in after if ".patches.c." in k or k.startswith("heads.c.")}
    assert changed and changed <= private_c  # shared weights, shared BN statistics, task a: bit-identical
    assert {"heads.c.weight", "heads.c.bias"} <= changed
    assert any(".patches.c." in k and k.endswith("weight") for k in changed)
    assert all(p.requires_grad is False for p in enc.shared_parameters())
    assert all(p.requires_grad for p in enc.task_parameters("c"))
    # a fresh patch (init_from=None) starts as new layers: BatchNorm at scale 1, bias 0, reset
    # statistics; depthwise filters drawn anew
    enc.add_task("d")
    for layer in enc.patched_layers():
        fresh, trained = layer.patches["d"], layer.patches["c"]
        if layer.kind == "scale_bias":
            assert torch.equal(fresh.weight, torch.ones(4)) and torch.equal(fresh.running_mean, torch.zeros(4))
        else:
            assert fresh.weight.shape == trained.weight.shape and not torch.equal(fresh.weight, trained.weight)
    assert all(p.requires_grad for p in enc.task_parameters("d"))
    # transfer=True builds the encoder in this mode directly
    frozen = PatchedEncoder(tiny_net(), ["a"], patch=patch, transfer=True)
    assert frozen.frozen and not any(p.requires_grad for p in frozen.shared_parameters())


def test_mobilenet_v2_builder_gives_both_patch_types_and_a_vector():
    enc = build_patched_encoder("mobilenet_v2", ["a", "b"], patch="both", in_channels=1)
    kinds = [layer.kind for layer in enc.patched_layers()]
    assert kinds.count("scale_bias") == 52 and kinds.count("depthwise") == 17
    assert enc.out_features == 1280
    out = enc(torch.randn(2, 1, 32, 32))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (2, 1280), "b": (2, 1280)}
    # the patches are a few percent of the network
    per_task = enc.trainable_parameters_per_task()["a"]
    assert per_task < 0.05 * enc.shared_parameter_count()


def test_patched_model_learns_with_the_trainer(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
    )
    enc = PatchedEncoder(base, ["a", "b"], patch="both")
    model = MultiTaskModel(enc, {t: ClassificationHead(512, 10) for t in "ab"})
    tasks = [classification_task(t, 10) for t in "ab"]
    cfg = TrainerConfig(epochs=3, batch_size=16, lr=3e-3, progress=False, tensorboard=False)
    history = Trainer(model, tasks, build_weighting("equal", tasks), TwoTaskDigits(320, seed=1),
                      TwoTaskDigits(100, seed=2), cfg, tmp_path).fit()
    first, last = history["epochs"][0], history["epochs"][-1]
    assert last["train_loss"]["a"] < first["train_loss"]["a"] and last["train_loss"]["b"] < first["train_loss"]["b"]
    assert last["eval"]["a"]["accuracy"] >= 0.3 and last["eval"]["b"]["accuracy"] >= 0.3  # chance: 0.1
