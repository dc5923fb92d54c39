"""CelebA attributes from torchvision's folder layout: parsing, images, and folder validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl.data import CelebA
from mtl.data.celeba import IMAGENET_MEAN, IMAGENET_STD, MD5
from mtl.data.synthetic import CELEBA_ATTRIBUTES
from mtl.errors import ConfigError, DataError

ATTRIBUTES = list(CELEBA_ATTRIBUTES)
PARTITION = [0, 0, 0, 1, 1, 2]  # train, train, train, valid, valid, test


# ---------------------------------------------------------------------------
# fixture writer: torchvision's CelebA layout and the original text formats
# ---------------------------------------------------------------------------


def colour(i: int) -> tuple[int, int, int]:
    return (20 + 30 * i, 200 - 25 * i, 90 + 10 * i)


def attr_text(names, rows, count=None, newline="\n") -> str:
    """As in the original file: count, names (with a trailing space), then '-1' and ' 1' in 2-wide columns."""
    lines = [str(len(rows) if count is None else count), " ".join(names) + " "]
    lines += [name + "".join(f" {v:2d}" for v in values) for name, values in rows]
    return newline.join(lines) + newline


def write_celeba(root: Path, partition=PARTITION, newline="\n", seed=0):
    """Small 178x218 JPEGs of one flat colour each, and random -1/1 attributes; returns (names, values)."""
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    values = rng.choice([-1, 1], size=(len(partition), 40))
    for i, name in enumerate(names):
        Image.new("RGB", (178, 218), colour(i)).save(images / name, quality=95)
    (folder / "list_attr_celeba.txt").write_text(attr_text(ATTRIBUTES, list(zip(names, values)), newline=newline),
                                                 newline="")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {p}{newline}" for name, p in zip(names, partition)), newline="")
    return names, values


@pytest.fixture
def celeba(tmp_path):
    names, values = write_celeba(tmp_path)
    return tmp_path, names, values


def expected_pixels(i: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    rgb = torch.tensor(colour(i), dtype=torch.float32) / 255.0
    return (rgb - torch.tensor(mean)) / torch.tensor(std)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_splits_images_and_all_forty_targets(tmp_path, newline):
    names, values = write_celeba(tmp_path, newline=newline)
    for split, code in (("train", 0), ("valid", 1), ("test", 2)):
        data = CelebA(str(tmp_path), split)
        rows = [i for i, p in enumerate(PARTITION) if p == code]
        assert len(data) == len(rows) and data.filenames == [names[i] for i in rows]
        assert data.attribute_names == ATTRIBUTES and data.attributes == ATTRIBUTES
        for k, i in enumerate(rows):
            image, targets = data[k]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            # a flat JPEG colour survives within a couple of grey levels
            np.testing.assert_allclose(image.numpy(), expected_pixels(i).view(3, 1, 1).expand(3, 64, 64).numpy(),
                                       atol=3 / 255 / 0.224, rtol=0)
            assert list(targets) == ATTRIBUTES
            for a, name in enumerate(ATTRIBUTES):
                assert targets[name].dtype == torch.float32 and targets[name].shape == (1,)
                assert float(targets[name]) == (1.0 if values[i, a] == 1 else 0.0)
        np.testing.assert_array_equal(data.targets.numpy(), (values[rows] == 1).astype(np.float32))


def test_size_subset_and_normalisation(celeba):
    root, names, values = celeba
    data = CelebA(root, "valid", size=32, attributes=["Smiling", "Male"], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image, targets = data[1]
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(image[:, 16, 16].numpy(), np.array(colour(4)) / 255, atol=3 / 255, rtol=0)
    assert list(targets) == ["Smiling", "Male"]
    assert float(targets["Male"]) == float(values[4, ATTRIBUTES.index("Male")] == 1)
    assert float(targets["Smiling"]) == float(values[4, ATTRIBUTES.index("Smiling")] == 1)
    assert list(CelebA(root, "test", attributes="Young")[0][1]) == ["Young"]


def test_batches_of_binary_targets_fit_a_one_logit_head(celeba):
    from mtl.tasks import binary_task

    root, _, _ = celeba
    image, targets = next(iter(torch.utils.data.DataLoader(CelebA(root, "train", size=16), batch_size=3)))
    assert image.shape == (3, 3, 16, 16) and targets["Young"].shape == (3, 1)
    task = binary_task("Young")
    loss = task.loss(torch.zeros(3, 1), task.target(targets))
    assert abs(float(loss) - np.log(2.0)) < 1e-6


def test_unknown_attribute_names_the_valid_ones(celeba):
    root, _, _ = celeba
    with pytest.raises(DataError, match="unknown CelebA attribute") as err:
        CelebA(root, attributes=["Smiling", "Happy"])
    assert "'Happy'" in str(err.value) and "5_o_Clock_Shadow" in str(err.value) and "Young" in str(err.value)
    with pytest.raises(DataError, match="without repeats"):
        CelebA(root, attributes=["Male", "Male"])


def test_bad_options(celeba):
    root, _, _ = celeba
    with pytest.raises(DataError, match="unknown CelebA split 'val'"):
        CelebA(root, "val")
    with pytest.raises(ConfigError, match="size"):
        CelebA(root, size=0)
    with pytest.raises(ConfigError, match="std"):
        CelebA(root, std=(0.0, 1.0, 1.0))


def test_extra_torchvision_files_are_not_needed_but_harmless(celeba):
    root, _, _ = celeba
    assert not (root / "celeba" / "identity_CelebA.txt").exists()
    (root / "celeba" / "list_bbox_celeba.txt").write_text("garbage")
    assert len(CelebA(root, "train")) == 3


def test_md5_check(celeba):
    root, _, _ = celeba
    CelebA(root, verify_md5=False)
    attr = root / "celeba" / "list_attr_celeba.txt"
    with pytest.raises(DataError, match="md5") as err:
        CelebA(root, verify_md5=True)
    got = hashlib.md5(attr.read_bytes()).hexdigest()
    assert str(attr) in str(err.value) and got in str(err.value) and MD5["list_attr_celeba.txt"] in str(err.value)
    assert MD5 == {"list_attr_celeba.txt": "75e246fa4810816ffd6ee81facbd244c",
                   "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668"}


def test_md5_table_matches_torchvision():
    # read torchvision's CelebA.file_list from its source: importing torchvision.datasets takes seconds
    import importlib.util

    source = Path(importlib.util.find_spec("torchvision").origin).parent / "datasets" / "celeba.py"
    lines = [line for line in source.read_text().splitlines() if line.strip().startswith("(")]
    for name, md5 in MD5.items():
        assert any(f'"{md5}"' in line and f'"{name}"' in line for line in lines), name


# ---------------------------------------------------------------------------
# folder validation
# ---------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        CelebA(tmp_path / "none")
    assert str(tmp_path / "none") in str(err.value) and "img_align_celeba" in str(err.value)


def test_missing_celeba_folder_and_the_celeba_folder_passed_as_root(celeba):
    root, _, _ = celeba
    with pytest.raises(DataError, match="pass its parent") as err:
        CelebA(root / "celeba")
    assert str(root) in str(err.value)
    with pytest.raises(DataError, match="has no celeba/ folder"):
        CelebA(root / "celeba" / "img_align_celeba")


@pytest.mark.parametrize("missing", ["img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"])
def test_missing_file_or_folder_is_named(celeba, missing):
    root, _, _ = celeba
    import shutil

    path = root / "celeba" / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DataError, match="lacks") as err:
        CelebA(root)
    assert str(path) in str(err.value).split("; expected")[0]


def rewrite_attr(root: Path, transform):
    path = root / "celeba" / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(transform(lines)) + "\n")
    return path


@pytest.mark.parametrize("transform, match", [
    (lambda ls: ls[:3] + [ls[3] + "  1"] + ls[4:], "line 4 .* has 42 columns"),
    (lambda ls: ls[:4] + [ls[4].rsplit(" ", 1)[0]] + ls[5:], "line 5 .* has 40 columns"),
    (lambda ls: ls[:2] + [ls[2].replace(" -1", "  0", 1).replace("  1", "  0", 1)] + ls[3:], "value '0'"),
    (lambda ls: ls[:6] + [ls[6][:11] + " 2" + ls[6][13:]] + ls[7:], "line 7 .*value '2'"),
    (lambda ls: ls[:3] + [ls[3][:11] + "-10" + ls[3][13:]] + ls[4:], "value '-10'"),
    (lambda ls: [ls[0], " ".join(ATTRIBUTES[:39])] + ls[2:], "39 names"),
    (lambda ls: [ls[0], " ".join(ATTRIBUTES[:39] + ["Male"])] + ls[2:], r"40 names \(39 distinct\)"),
    (lambda ls: ls[1:], "not the image count"),
    (lambda ls: ["7"] + ls[1:], "says it holds 7 images"),
    (lambda ls: ls[:-1], "says it holds 6 images .* lists 5"),
    (lambda ls: ls + [ls[2]], "lists 000001.jpg twice"),
    (lambda ls: ls[:1], "too few"),
])
def test_malformed_attr_file(celeba, transform, match):
    root, _, _ = celeba
    path = rewrite_attr(root, transform)
    with pytest.raises(DataError, match=match) as err:
        CelebA(root)
    assert str(path) in str(err.value)


def test_bad_value_message_names_the_attribute(celeba):
    root, _, _ = celeba
    rewrite_attr(root, lambda ls: ls[:2] + [ls[2].split()[0] + " 1" * 39 + " 0"] + ls[3:])
    with pytest.raises(DataError, match=r"000001.jpg\) holds the value '0' for Young"):
        CelebA(root)


@pytest.mark.parametrize("content, match", [
    ("000001.jpg 0\n000002.jpg 3\n", "line 2 .* '000002.jpg 3'"),
    ("000001.jpg\n", "line 1"),
    ("000001.jpg 0\n000001.jpg 1\n", "lists 000001.jpg twice"),
])
def test_malformed_partition_file(celeba, content, match):
    root, _, _ = celeba
    path = root / "celeba" / "list_eval_partition.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        CelebA(root)
    assert str(path) in str(err.value)


def test_partition_listing_an_image_absent_from_the_folder(celeba):
    root, names, _ = celeba
    (root / "celeba" / "img_align_celeba" / names[3]).unlink()
    CelebA(root, "train")  # other splits are unaffected
    with pytest.raises(DataError, match="missing from") as err:
        CelebA(root, "valid")
    assert names[3] in str(err.value) and names[4] not in str(err.value)


def test_partition_listing_an_image_absent_from_the_attr_file(celeba):
    root, names, _ = celeba
    rewrite_attr(root, lambda ls: ["5"] + ls[1:7])  # drops the test image's row
    CelebA(root, "valid")
    with pytest.raises(DataError, match="does not") as err:
        CelebA(root, "test")
    assert names[5] in str(err.value) and "list_attr_celeba.txt" in str(err.value)


def test_empty_split(tmp_path):
    write_celeba(tmp_path, partition=[0, 0, 2])
    with pytest.raises(DataError, match="'valid' split is empty"):
        CelebA(tmp_path, "valid")


def test_unreadable_image_is_reported_on_load(celeba):
    root, names, _ = celeba
    path = root / "celeba" / "img_align_celeba" / names[1]
    path.write_bytes(b"not a jpeg")
    data = CelebA(root, "train")
    data[0]
    with pytest.raises(DataError, match="could not read the CelebA image") as err:
        data[1]
    assert str(path) in str(err.value)
