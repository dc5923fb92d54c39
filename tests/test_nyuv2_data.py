"""NYUv2 (mtan / LibMTL .npy layout): exact reading, folder validation, and the scale-crop-flip augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mtl.data import NYUv2
from mtl.data.nyuv2 import Augmentation, scale_crop_flip
from mtl.errors import ConfigError, DataError

H, W = 12, 16  # small maps keep the tests fast; the loader takes any H x W

# ---------------------------------------------------------------------------
# fixture writer: the exact on-disk format of mtan's preprocessed NYUv2
# ---------------------------------------------------------------------------


def fake_nyuv2_arrays(n: int, height: int = 288, width: int = 384, seed: int = 0, dtype=np.float64):
    """``n`` samples as mtan stores them: image HxWx3 in [0, 1], label HxW -1..12, depth HxWx1, normal HxWx3.

    Depth and normals are zero (unknown) on a few pixels, as in the real files.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        image = rng.integers(0, 256, size=(height, width, 3)) / 255.0
        label = rng.integers(-1, 13, size=(height, width)).astype(np.float64)
        depth = rng.uniform(0.5, 10.0, size=(height, width, 1))
        normal = rng.normal(size=(height, width, 3))
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        holes = rng.random((height, width)) < 0.1
        depth[holes] = 0.0
        normal[holes] = 0.0
        samples.append({
            "image": image.astype(dtype), "label": label.astype(dtype),
            "depth": depth.astype(dtype), "normal": normal.astype(dtype),
        })
    return samples


def write_nyuv2(root: Path, split: str, samples) -> Path:
    folder = root / split
    for modality in ("image", "label", "depth", "normal"):
        (folder / modality).mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        for modality, array in sample.items():
            np.save(folder / modality / f"{i}.npy", array)
    return folder


@pytest.fixture
def nyu(tmp_path):
    train = fake_nyuv2_arrays(3, H, W, seed=1)
    val = fake_nyuv2_arrays(2, H, W, seed=2)
    write_nyuv2(tmp_path, "train", train)
    write_nyuv2(tmp_path, "val", val)
    return tmp_path, train, val


def channels_first(array: np.ndarray) -> np.ndarray:
    return np.moveaxis(array, -1, 0)


def assert_sample_equals(got, sample):
    image, targets = got
    assert set(targets) == {"segmentation", "depth", "normal"}
    assert image.dtype == torch.float32 and image.shape == (3,) + sample["label"].shape
    assert targets["segmentation"].dtype == torch.int64 and targets["segmentation"].shape == sample["label"].shape
    assert targets["depth"].dtype == torch.float32 and targets["depth"].shape == (1,) + sample["label"].shape
    assert targets["normal"].dtype == torch.float32 and targets["normal"].shape == (3,) + sample["label"].shape
    np.testing.assert_array_equal(image.numpy(), channels_first(sample["image"]).astype(np.float32))
    np.testing.assert_array_equal(targets["segmentation"].numpy(), sample["label"].astype(np.int64))
    np.testing.assert_array_equal(targets["depth"].numpy(), channels_first(sample["depth"]).astype(np.float32))
    np.testing.assert_array_equal(targets["normal"].numpy(), channels_first(sample["normal"]).astype(np.float32))


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def test_round_trip_of_both_splits(nyu):
    root, train, val = nyu
    for split, samples in (("train", train), ("val", val)):
        data = NYUv2(str(root), split)
        assert len(data) == len(samples) and (data.height, data.width) == (H, W)
        for i, sample in enumerate(samples):
            assert_sample_equals(data[i], sample)
        assert_sample_equals(data[-1], samples[-1])
        with pytest.raises(IndexError):
            data[len(samples)]


def test_round_trip_at_the_published_288_by_384_size(tmp_path):
    samples = fake_nyuv2_arrays(1, seed=3)
    write_nyuv2(tmp_path, "val", samples)
    data = NYUv2(tmp_path, "val")
    assert (data.height, data.width) == (288, 384)
    assert_sample_equals(data[0], samples[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_other_float_dtypes_and_integer_labels_are_read(tmp_path, dtype):
    samples = fake_nyuv2_arrays(2, H, W, seed=4, dtype=dtype)
    for sample in samples:
        sample["label"] = sample["label"].astype(np.int16)
    write_nyuv2(tmp_path, "train", samples)
    data = NYUv2(tmp_path, "train")
    for i, sample in enumerate(samples):
        assert_sample_equals(data[i], sample)


def test_batches_collate_to_the_documented_shapes(nyu):
    root, _, _ = nyu
    image, targets = next(iter(DataLoader(NYUv2(root, "train", augment=True), batch_size=3)))
    assert image.shape == (3, 3, H, W)
    assert targets["segmentation"].shape == (3, H, W) and targets["segmentation"].dtype == torch.int64
    assert targets["depth"].shape == (3, 1, H, W) and targets["normal"].shape == (3, 3, H, W)


# ---------------------------------------------------------------------------
# folder validation
# ---------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        NYUv2(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "{train,val}" in str(err.value)


def test_missing_split_folder(nyu):
    root, _, _ = nyu
    import shutil

    shutil.rmtree(root / "val")
    NYUv2(root, "train")
    with pytest.raises(DataError, match="split folder") as err:
        NYUv2(root, "val")
    assert str(root / "val") in str(err.value)


def test_unknown_split_and_bad_options(nyu):
    root, _, _ = nyu
    with pytest.raises(DataError, match="unknown NYUv2 split 'test'"):
        NYUv2(root, "test")
    with pytest.raises(ConfigError, match="seed"):
        NYUv2(root, seed=-1)
    with pytest.raises(ConfigError, match="scales"):
        NYUv2(root, scales=(0.5,))
    with pytest.raises(ConfigError, match="flip_prob"):
        NYUv2(root, flip_prob=1.5)
    with pytest.raises(ConfigError, match="depth_mode"):
        NYUv2(root, depth_mode="cubic")
    with pytest.raises(ConfigError, match="set_epoch"):
        NYUv2(root).set_epoch(-1)


@pytest.mark.parametrize("modality", ["image", "label", "depth", "normal"])
def test_missing_subfolder_is_named(nyu, modality):
    root, _, _ = nyu
    import shutil

    shutil.rmtree(root / "train" / modality)
    with pytest.raises(DataError, match="lacks") as err:
        NYUv2(root, "train")
    assert str(root / "train" / modality) in str(err.value)


def test_mismatched_file_counts_name_the_missing_file(nyu):
    root, _, _ = nyu
    (root / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(DataError, match="same samples") as err:
        NYUv2(root, "train")
    message = str(err.value)
    assert str(root / "train" / "depth" / "2.npy") in message and "depth/ has 2 files" in message
    assert "image/ has" not in message


def test_mismatched_index_sets_name_the_files(nyu):
    root, train, _ = nyu
    folder = root / "train"
    (folder / "label" / "2.npy").rename(folder / "label" / "3.npy")  # same count, different indices
    with pytest.raises(DataError, match="same samples") as err:
        NYUv2(root, "train")
    message = str(err.value)
    assert str(folder / "label" / "2.npy") in message
    for modality in ("image", "depth", "normal"):
        assert str(folder / modality / "3.npy") in message


def test_non_contiguous_indices(nyu):
    root, _, _ = nyu
    for modality in ("image", "label", "depth", "normal"):
        (root / "train" / modality / "1.npy").rename(root / "train" / modality / "5.npy")
    with pytest.raises(DataError, match="not contiguous") as err:
        NYUv2(root, "train")
    assert "1.npy" in str(err.value) and "4.npy" in str(err.value)


def test_badly_named_file(nyu):
    root, _, _ = nyu
    np.save(root / "train" / "image" / "extra.npy", np.zeros((H, W, 3)))
    with pytest.raises(DataError, match="unexpected file") as err:
        NYUv2(root, "train")
    assert "extra.npy" in str(err.value)


def test_empty_split(tmp_path):
    write_nyuv2(tmp_path, "train", [])
    with pytest.raises(DataError, match="no samples"):
        NYUv2(tmp_path, "train")


@pytest.mark.parametrize(
    "modality, index, shape",
    [
        ("image", 0, (H, W, 4)),
        ("image", 0, (3, H, W)),  # already channels-first: not the mtan layout
        ("image", 2, (H + 1, W, 3)),  # one sample of another size
        ("label", 1, (H, W, 1)),
        ("depth", 0, (H, W)),
        ("normal", 2, (H, W - 1, 3)),
    ],
)
def test_wrong_shape_names_the_file_and_the_expected_shape(nyu, modality, index, shape):
    root, _, _ = nyu
    path = root / "train" / modality / f"{index}.npy"
    np.save(path, np.zeros(shape))
    with pytest.raises(DataError, match="shape") as err:
        NYUv2(root, "train")
    message = str(err.value)
    assert str(path) in message and str(shape) in message
    if index > 0:
        assert str((H, W) + ((3,) if modality != "label" else ())) in message


@pytest.mark.parametrize("modality, array", [
    ("image", np.zeros((H, W, 3), np.uint8)),
    ("depth", np.zeros((H, W, 1), np.int32)),
    ("normal", np.zeros((H, W, 3), np.complex64)),
    ("label", np.zeros((H, W), bool)),
])
def test_wrong_dtype_names_the_file_and_the_expected_dtype(nyu, modality, array):
    root, _, _ = nyu
    path = root / "train" / modality / "1.npy"
    np.save(path, array)
    with pytest.raises(DataError, match="float") as err:
        NYUv2(root, "train")
    assert str(path) in str(err.value) and str(array.dtype) in str(err.value)


def test_pickled_object_array_is_rejected_from_its_header(nyu):
    root, _, _ = nyu
    path = root / "train" / "normal" / "1.npy"
    np.save(path, np.empty((H, W, 3), dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="object") as err:
        NYUv2(root, "train")
    assert str(path) in str(err.value)


def test_truncated_and_non_npy_files(nyu):
    root, _, _ = nyu
    path = root / "train" / "depth" / "2.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated") as err:
        NYUv2(root, "train")
    assert str(path) in str(err.value)
    path.write_bytes(b"not an array")
    with pytest.raises(DataError, match="not a readable .npy file") as err:
        NYUv2(root, "train")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("value", [13, -2, 2.5])
def test_label_out_of_range_is_reported_on_load(nyu, value):
    root, train, _ = nyu
    label = train[2]["label"].copy()
    label[3, 4] = value
    path = root / "train" / "label" / "2.npy"
    np.save(path, label)
    data = NYUv2(root, "train")  # only sample 0 is read in full up front
    data[1]
    with pytest.raises(DataError, match="-1..12") as err:
        data[2]
    assert str(path) in str(err.value) and str(value) in str(err.value)


def test_bad_first_label_is_reported_when_built(nyu):
    root, train, _ = nyu
    label = train[0]["label"].copy()
    label[0, 0] = 40
    np.save(root / "train" / "label" / "0.npy", label)
    with pytest.raises(DataError, match="label value 40"):
        NYUv2(root, "train")


def test_nan_depth_is_reported(nyu):
    root, train, _ = nyu
    depth = train[1]["depth"].copy()
    depth[0, 0, 0] = np.nan
    np.save(root / "train" / "depth" / "1.npy", depth)
    with pytest.raises(DataError, match="NaN") as err:
        NYUv2(root, "train")[1]
    assert "1.npy" in str(err.value)


# ---------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------


def test_scale_one_without_flip_is_the_identity(nyu):
    root, train, _ = nyu
    data = NYUv2(root, "train", augment=True, scales=(1.0,), flip_prob=0.0)
    for epoch in range(3):
        data.set_epoch(epoch)
        for i, sample in enumerate(train):
            assert data.draw_augmentation(i) == Augmentation(1.0, 0, 0, False)
            assert_sample_equals(data[i], sample)


def test_default_draw_with_scale_one_and_no_flip_is_the_identity(nyu):
    root, train, _ = nyu
    data = NYUv2(root, "train", augment=True)
    found = [(e, i) for e in range(30) for i in range(3)
             if (a := data.draw_augmentation(i, e)).scale == 1.0 and not a.flip]
    assert found  # about one draw in six
    epoch, index = found[0]
    data.set_epoch(epoch)
    assert_sample_equals(data[index], train[index])


def test_flip_mirrors_everything_and_negates_normal_x(nyu):
    root, train, _ = nyu
    data = NYUv2(root, "train", augment=True, scales=(1.0,), flip_prob=1.0)
    mirrored = {k: v[:, ::-1] for k, v in train[1].items()}
    mirrored["normal"] = mirrored["normal"] * np.array([-1.0, 1.0, 1.0])
    assert_sample_equals(data[1], mirrored)
    _, targets = data[1]
    # invalid normals stay invalid (channels still sum to 0) and valid ones keep their length
    normal = targets["normal"]
    raw = torch.from_numpy(channels_first(train[1]["normal"]).astype(np.float32)).flip(-1)
    assert torch.equal(normal.sum(0) == 0, raw.sum(0) == 0)
    assert torch.allclose(normal.norm(dim=0), raw.norm(dim=0))


@pytest.mark.parametrize("scale", [1.2, 1.5])
@pytest.mark.parametrize("depth_mode", ["nearest", "bilinear"])
def test_depth_is_divided_by_the_scale(tmp_path, scale, depth_mode):
    samples = fake_nyuv2_arrays(2, H, W, seed=5)
    for sample in samples:
        sample["depth"][:] = 3.0
    write_nyuv2(tmp_path, "train", samples)
    data = NYUv2(tmp_path, "train", augment=True, scales=(scale,), depth_mode=depth_mode)
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(2):
            _, targets = data[i]
            np.testing.assert_allclose(targets["depth"].numpy(), np.full((1, H, W), 3.0 / scale), rtol=1e-6)


def test_scale_crop_resamples_the_drawn_region(nyu):
    root, train, _ = nyu
    data = NYUv2(root, "train", augment=True, scales=(1.5,), flip_prob=0.0)
    aug = data.draw_augmentation(0)
    h, w = int(H / 1.5), int(W / 1.5)
    assert 0 <= aug.top <= H - h and 0 <= aug.left <= W - w
    image, targets = data[0]
    raw = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in train[0].items()}
    region = (slice(aug.top, aug.top + h), slice(aug.left, aug.left + w))
    crop_image = raw["image"][region].permute(2, 0, 1)
    expect = F.interpolate(crop_image[None], size=(H, W), mode="bilinear", align_corners=True)[0]
    assert torch.equal(image, expect)
    # corners of an align_corners resize are the crop's corner pixels
    assert torch.allclose(image[:, 0, 0], crop_image[:, 0, 0])
    assert torch.allclose(image[:, -1, -1], crop_image[:, -1, -1])
    expect_label = F.interpolate(raw["label"][region][None, None], size=(H, W), mode="nearest")[0, 0]
    assert torch.equal(targets["segmentation"], expect_label.to(torch.int64))
    # normals: resampled, never rescaled
    crop_normal = raw["normal"][region].permute(2, 0, 1)
    assert torch.allclose(targets["normal"][:, 0, 0], crop_normal[:, 0, 0])
    assert torch.allclose(targets["normal"][:, -1, -1], crop_normal[:, -1, -1])


def test_labels_stay_integers_in_range(nyu):
    root, train, _ = nyu
    data = NYUv2(root, "train", augment=True)
    for epoch in range(8):
        data.set_epoch(epoch)
        for i in range(len(data)):
            label = data[i][1]["segmentation"]
            assert label.dtype == torch.int64
            assert int(label.min()) >= -1 and int(label.max()) <= 12
            assert set(label.unique().tolist()) <= set(np.unique(train[i]["label"]).astype(int).tolist())


def test_same_seed_epoch_index_gives_the_same_sample(nyu):
    root, _, _ = nyu
    a = NYUv2(root, "train", augment=True, seed=7)
    b = NYUv2(root, "train", augment=True, seed=7)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in (2, 0, 1):  # order of access does not matter
            ia, ta = a[i]
            torch.manual_seed(123)  # nor does the global RNG
            ib, tb = b[i]
            assert torch.equal(ia, ib) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_different_epoch_or_seed_gives_different_augmentation(nyu):
    root, _, _ = nyu
    data = NYUv2(root, "train", augment=True, seed=0)
    draws = [data.draw_augmentation(0, epoch) for epoch in range(10)]
    assert len(set(draws)) > 1
    epochs = [e for e in range(1, 10) if draws[e] != draws[0]]
    data.set_epoch(0)
    first = data[0][0]
    data.set_epoch(epochs[0])
    assert not torch.equal(first, data[0][0])
    other_seed = NYUv2(root, "train", augment=True, seed=1)
    assert [other_seed.draw_augmentation(0, e) for e in range(10)] != draws
    # over many draws every scale and both flips occur
    many = [data.draw_augmentation(i, e) for e in range(40) for i in range(3)]
    assert {a.scale for a in many} == {1.0, 1.2, 1.5} and {a.flip for a in many} == {True, False}


def test_validation_split_never_augments(nyu):
    root, _, val = nyu
    data = NYUv2(root, "val", augment=True, scales=(1.5,), flip_prob=1.0)
    assert not data.augment
    data.set_epoch(4)
    for i, sample in enumerate(val):
        assert_sample_equals(data[i], sample)


def test_scale_crop_flip_on_hand_built_maps():
    image = torch.arange(2 * 4, dtype=torch.float32).reshape(1, 2, 4).repeat(3, 1, 1)
    label = torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1]])
    depth = torch.full((1, 2, 4), 2.0)
    normal = torch.stack([torch.ones(2, 4), torch.zeros(2, 4), -torch.ones(2, 4)])
    out_image, out_label, out_depth, out_normal = scale_crop_flip(
        image, label, depth, normal, Augmentation(1.0, 0, 0, True))
    assert torch.equal(out_label, torch.tensor([[3, 2, 1, 0], [-1, 6, 5, 4]]))
    assert torch.equal(out_image[0], torch.tensor([[3.0, 2, 1, 0], [7, 6, 5, 4]]))
    assert torch.equal(out_depth, depth)
    assert torch.equal(out_normal, torch.stack([-torch.ones(2, 4), torch.zeros(2, 4), -torch.ones(2, 4)]))
    # scale 2: a 1 x 2 crop at (1, 2) blown up to 2 x 4; depth halves
    _, out_label, out_depth, _ = scale_crop_flip(image, label, depth, normal, Augmentation(2.0, 1, 2, False))
    assert torch.equal(out_label, torch.tensor([[6, 6, -1, -1], [6, 6, -1, -1]]))
    assert torch.equal(out_depth, torch.full((1, 2, 4), 1.0))
