"""Digit domains for domain adaptation: one format, embedded domains, on-disk loaders, pairing."""

from __future__ import annotations

import bz2
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from adapt.data import (
    DOMAINS,
    DigitDomain,
    PairedDomains,
    Unlabelled,
    build_domain,
    check_compatible,
    check_value_range,
    mnist_domain,
    mnist_m_domain,
    mnist_m_style_domain,
    svhn_domain,
    uci_digits_domain,
    usps_domain,
)
from adapt.data.domain import LUMA, to_common_format
from adapt.data.embedded import _uci_arrays, uci_split_indices
from adapt.data.mnist_m_style import _photos, blend
from adapt.data.synthetic import write_mnist_m_split, write_svhn_file, write_usps_file
from mtl.data.mnist import load_mnist
from mtl.errors import ConfigError, DataError


def assert_common_format(domain, n, channels, size):
    assert len(domain) == n and domain.images.shape == (n, channels, size, size)
    assert domain.images.dtype == torch.float32 and domain.labels.dtype == torch.int64
    assert float(domain.images.min()) >= 0.0 and float(domain.images.max()) <= 1.0
    assert (domain.num_classes, domain.channels, domain.size) == (10, channels, size)
    image, label = domain[n - 1]
    assert image.shape == (channels, size, size) and image.dtype == torch.float32
    assert type(label) is int and 0 <= label <= 9


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    return sum(w * rgb[..., c, :, :] for c, w in enumerate(LUMA))


# ---------------------------------------------------------------------------
# embedded domains
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_train():
    return mnist_domain("train")


@pytest.fixture(scope="module")
def mnist_m_style_train():
    return mnist_m_style_domain("train")


def test_embedded_mnist_split_sizes_range_and_exact_scaling(mnist_train):
    test = mnist_domain("test")
    assert_common_format(mnist_train, 4000, 1, 28)
    assert_common_format(test, 1000, 1, 28)
    assert torch.bincount(mnist_train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    raw, labels = load_mnist("test")
    assert torch.equal(test.labels, labels)
    torch.testing.assert_close(test.images[:, 0], raw.float() / 255.0, rtol=0, atol=1e-7)
    assert float(test.images.max()) == 1.0  # 255 maps to exactly 1, not 255 and not 1/255


def test_size_and_channels_options(mnist_train):
    big = mnist_domain("test", size=32, channels=3)
    assert_common_format(big, 1000, 3, 32)
    assert torch.equal(big.images[:, 0], big.images[:, 2])  # grey repeated to three channels
    # bilinear resizing keeps the mean brightness of a digit roughly unchanged
    small = mnist_domain("test")
    assert abs(float(big.images.mean()) - float(small.images.mean())) < 0.01
    image, _ = big[0]
    image.fill_(0.5)  # an item is a copy: in-place transforms leave the domain intact
    assert not torch.all(big.images[0] == 0.5)


def test_uci_digits_split_is_fixed_stratified_and_scaled():
    train, test = uci_digits_domain("train"), uci_digits_domain("test")
    assert_common_format(train, 1438, 1, 28)
    assert_common_format(test, 359, 1, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert len(train) + len(test) == 1797
    images, labels = _uci_arrays()
    train_rows, test_rows = uci_split_indices(labels, "train"), uci_split_indices(labels, "test")
    assert len(set(train_rows) | set(test_rows)) == 1797 and not set(train_rows) & set(test_rows)
    native = uci_digits_domain("test", size=8)  # no resizing: exactly load_digits' images / 16
    torch.testing.assert_close(native.images[:, 0], torch.from_numpy(images[test_rows] / 16).float(), rtol=0, atol=0)
    assert native.labels.tolist() == labels[test_rows].tolist()
    assert float(native.images.max()) == 1.0  # 16 maps to 1
    again = uci_digits_domain("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_blend_is_absolute_difference_per_channel():
    digit = np.array([[[255, 0]]], dtype=np.uint8)  # one image, 1 x 2 pixels
    patch = np.array([[[[51, 128, 230], [51, 128, 230]]]], dtype=np.uint8)
    out = blend(digit, patch)
    assert out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [204, 127, 25]  # |patch - 255|, no uint8 wrap-around
    assert out[0, 0, 1].tolist() == [51, 128, 230]  # |patch - 0| = patch
    assert np.allclose(blend(np.array([[[1.0]]]), np.array([[[[0.2, 0.5, 0.9]]]])), [0.8, 0.5, 0.1])


def test_mnist_m_style_pixels_follow_the_blend_formula(mnist_m_style_train):
    domain = mnist_m_style_train
    assert_common_format(domain, 4000, 3, 28)
    digits, labels = load_mnist("train")
    assert torch.equal(domain.labels, labels)
    photos = _photos()
    for i, r, c in ((0, 14, 14), (1234, 3, 20), (3999, 27, 0)):
        photo, top, left = domain.patch_origins[i].tolist()
        patch = torch.from_numpy(photos[photo, top + r, left + c].astype(np.float32)) / 255.0
        expected = (patch - float(digits[i, r, c]) / 255.0).abs()
        torch.testing.assert_close(domain.images[i, :, r, c], expected, rtol=0, atol=1e-6)
    # the colour comes from the photos: channels differ, unlike a grey digit
    assert float((domain.images[:, 0] - domain.images[:, 2]).abs().mean()) > 0.02


def test_mnist_m_style_is_deterministic_given_a_seed(mnist_m_style_train):
    test = mnist_m_style_domain("test")
    assert_common_format(test, 1000, 3, 28)
    assert torch.equal(mnist_m_style_domain("test").images, test.images)
    other = mnist_m_style_domain("test", seed=1)
    assert not torch.equal(other.images, test.images) and torch.equal(other.labels, test.labels)
    # train and test draw from different streams: their first windows differ
    assert not torch.equal(mnist_m_style_train.patch_origins[:5], test.patch_origins[:5])
    grey = mnist_m_style_domain("test", channels=1)
    assert_common_format(grey, 1000, 1, 28)
    torch.testing.assert_close(grey.images[:, 0], luminance(test.images), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# the declared value range
# ---------------------------------------------------------------------------


def test_images_in_another_value_range_are_refused():
    labels = torch.arange(4)
    DigitDomain(torch.rand(4, 1, 8, 8), labels, "ok", "train")  # in range: accepted
    with pytest.raises(DataError, match=r"another value range than declared.*\[-1, 1\]"):
        DigitDomain(torch.rand(4, 1, 8, 8) * 2 - 1, labels, "usps_raw", "train")
    with pytest.raises(DataError, match="'mnist_raw'.*another value range.*255"):
        DigitDomain(torch.full((4, 1, 8, 8), 255.0), labels, "mnist_raw", "train")
    with pytest.raises(DataError, match="NaN"):
        DigitDomain(torch.full((4, 1, 8, 8), float("nan")), labels, "broken", "train")
    # a loader that forgets to scale is caught before resizing
    raw = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(DataError, match="another value range"):
        to_common_format(raw, lambda x: x.float(), 28, None, "forgot_to_scale")


def test_check_value_range_on_any_dataset():
    class Signed(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((1, 4, 4), -1.0 + i), i

    with pytest.raises(DataError, match="'Signed'.*another value range"):
        check_value_range(Signed())
    check_value_range(DigitDomain(torch.rand(2, 3, 4, 4), torch.tensor([0, 9]), "fine", "test"))
    domain = DigitDomain(torch.rand(2, 1, 4, 4), torch.tensor([0, 9]), "tampered", "test")
    domain.images = domain.images * 255
    with pytest.raises(DataError, match="'tampered'"):
        check_value_range(domain)


def test_bad_labels_and_shapes_are_refused():
    with pytest.raises(DataError, match="labels must be integers 0..9"):
        DigitDomain(torch.rand(2, 1, 4, 4), torch.tensor([0, 10]), "x", "train")
    with pytest.raises(DataError, match="2 images but labels of shape"):
        DigitDomain(torch.rand(2, 1, 4, 4), torch.tensor([0, 1, 2]), "x", "train")
    with pytest.raises(DataError, match=r"\(N, 1 or 3, S, S\)"):
        DigitDomain(torch.rand(2, 2, 4, 4), torch.tensor([0, 1]), "x", "train")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="validation"), "unknown split 'validation'"),
        (dict(size=0), "positive integer.*0"),
        (dict(size=28.0), "positive integer.*28.0"),
        (dict(channels=2), "channels must be 1.*got 2"),
    ],
)
def test_bad_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        uci_digits_domain(**{"split": "train", **kwargs})


# ---------------------------------------------------------------------------
# USPS: root/usps.bz2, root/usps.t.bz2 (bz2 libsvm, pixels in [-1, 1], labels 1..10)
# ---------------------------------------------------------------------------


def usps_pixels(n, seed):
    rng = np.random.default_rng(seed)
    pixels = np.round(rng.uniform(-1, 1, (n, 16, 16)), 6)
    pixels[:, 0, 0], pixels[:, 15, 15] = -1.0, 1.0  # both ends of the range
    pixels[:, 0, 1], pixels[:, 1, 0] = 0.5, -0.5  # tells rows from columns
    return pixels, np.arange(n) % 10


@pytest.fixture
def usps_root(tmp_path):
    train, test = usps_pixels(12, 1), usps_pixels(7, 2)
    write_usps_file(tmp_path / "usps.bz2", *train)
    write_usps_file(tmp_path / "usps.t.bz2", *test)
    return tmp_path, train, test


def test_usps_maps_minus_one_one_to_zero_one_exactly(usps_root):
    root, (pixels, digits), test = usps_root
    native = usps_domain(root, "train", size=16)
    assert_common_format(native, 12, 1, 16)
    torch.testing.assert_close(native.images[:, 0], torch.from_numpy((pixels + 1) / 2).float(), rtol=0, atol=1e-6)
    assert native[0][0][0, 0, 1] == 0.75 and native[0][0][0, 1, 0] == 0.25  # row-major, as written
    assert native.labels.tolist() == digits.tolist()
    assert float(native.images.min()) == 0.0 and float(native.images.max()) == 1.0
    assert_common_format(usps_domain(root, "test"), 7, 1, 28)
    assert_common_format(usps_domain(root, "test", size=32, channels=3), 7, 3, 32)


def test_usps_sparse_line_leaves_missing_pixels_at_zero(tmp_path):
    with bz2.open(tmp_path / "usps.bz2", "wt") as f:
        f.write("3 1:1.0 256:-1.0\n\n")  # libsvm drops zeros; a blank line is skipped
    domain = usps_domain(tmp_path, "train", size=16)
    assert len(domain) == 1 and domain.labels.tolist() == [2]
    image = domain.images[0, 0]
    assert image[0, 0] == 1.0 and image[15, 15] == 0.0 and image[7, 7] == 0.5


@pytest.mark.parametrize(
    "content, message",
    [
        ("11 1:0.5\n", "label 11 is outside 1..10"),
        ("1 1:1.5\n", r"pixel value 1.5 is outside \[-1, 1\]"),
        ("1 300:0.5\n", "pixel index 300 is outside 1..256"),
        ("1 1:abc\n", "not a USPS libsvm line"),
        ("", "holds no images"),
    ],
)
def test_usps_malformed_lines(tmp_path, content, message):
    with bz2.open(tmp_path / "usps.bz2", "wt") as f:
        f.write(content)
    with pytest.raises(DataError, match=message) as info:
        usps_domain(tmp_path, "train")
    assert "usps.bz2" in str(info.value)


def test_usps_missing_or_broken_files(usps_root, tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data-root.*usps.bz2 and root/usps.t.bz2"):
        usps_domain(tmp_path / "nowhere", "train")
    root = usps_root[0]
    (root / "usps.t.bz2").unlink()
    with pytest.raises(DataError, match=r"usps.t.bz2' is missing\. Expected root/usps.bz2"):
        usps_domain(root, "test")
    (root / "usps.t.bz2").write_text("1 1:0.5\n")  # uncompressed
    with pytest.raises(DataError, match="bz2-compressed"):
        usps_domain(root, "test")
    with pytest.raises(DataError, match="md5 .* torchvision publishes"):
        usps_domain(root, "train", verify_md5=True)


# ---------------------------------------------------------------------------
# SVHN: root/{train,test}_32x32.mat (X 32x32x3xN uint8, y Nx1 in 1..10)
# ---------------------------------------------------------------------------


@pytest.fixture
def svhn_root(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 1, 2], images[:, 1, 0, 2] = 200, 7  # row 0, column 1, blue
    digits = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    write_svhn_file(tmp_path / "train_32x32.mat", images, digits)
    write_svhn_file(tmp_path / "test_32x32.mat", images[:4], digits[:4])
    return tmp_path, images, digits


def test_svhn_layout_labels_and_scaling(svhn_root):
    import scipy.io

    root, images, digits = svhn_root
    assert scipy.io.loadmat(str(root / "train_32x32.mat"))["y"].ravel().tolist()[0] == 10  # the file's convention
    domain = svhn_domain(root, "train", size=32)
    assert_common_format(domain, 10, 3, 32)
    assert domain.labels.tolist() == digits.tolist()  # 10 read back as 0
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(domain.images, expected, rtol=0, atol=1e-7)
    assert domain.images[0, 2, 0, 1] == 200 / 255 and domain.images[0, 2, 1, 0] == 7 / 255
    assert_common_format(svhn_domain(root, "test"), 4, 3, 28)  # shrunk to the default size
    grey = svhn_domain(root, "test", size=32, channels=1)
    torch.testing.assert_close(grey.images[:, 0], luminance(expected[:4]), rtol=0, atol=1e-6)


def test_svhn_malformed_files(svhn_root):
    import scipy.io

    root, images, digits = svhn_root
    path = root / "train_32x32.mat"
    x = images.transpose(1, 2, 3, 0)
    cases = [
        ({"X": x}, "no variable y"),
        ({"X": x[:, :, :, :3], "y": np.ones((10, 1))}, "3 images but 10 labels"),
        ({"X": x[:28, :28], "y": np.ones((10, 1))}, r"X of shape \(28, 28, 3, 10\)"),
        ({"X": x.astype(np.float64), "y": np.ones((10, 1))}, "dtype float64"),
        ({"X": x, "y": np.zeros((10, 1))}, "label 0.*1..10"),
    ]
    for content, message in cases:
        scipy.io.savemat(str(path), content)
        with pytest.raises(DataError, match=message):
            svhn_domain(root, "train")
    path.write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="as a MATLAB .mat file"):
        svhn_domain(root, "train")
    with pytest.raises(DataError, match="md5"):
        svhn_domain(root, "test", verify_md5=True)
    (root / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="test_32x32.mat' is missing.*train_32x32.mat and root/test_32x32.mat"):
        svhn_domain(root, "test")


# ---------------------------------------------------------------------------
# MNIST-M: root/mnist_m/mnist_m_{split}/*.png + root/mnist_m/mnist_m_{split}_labels.txt
# ---------------------------------------------------------------------------


@pytest.fixture
def mnist_m_root(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    digits = np.array([3, 1, 4, 1, 5, 9])
    write_mnist_m_split(tmp_path, "train", images, digits)
    write_mnist_m_split(tmp_path, "test", images[:2], digits[:2])
    return tmp_path, images, digits


def test_mnist_m_reads_listed_pngs_in_order(mnist_m_root):
    root, images, digits = mnist_m_root
    domain = mnist_m_domain(root, "train")
    assert_common_format(domain, 6, 3, 28)
    assert domain.labels.tolist() == digits.tolist()
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(domain.images, expected, rtol=0, atol=1e-7)
    labels_file = root / "mnist_m" / "mnist_m_train_labels.txt"
    lines = labels_file.read_text().splitlines()
    labels_file.write_text("\n".join(lines[::-1][:3]) + "\n")  # order and membership come from the file
    reordered = mnist_m_domain(root, "train")
    assert reordered.labels.tolist() == digits[::-1][:3].tolist()
    assert torch.equal(reordered.images[0], domain.images[5])
    assert_common_format(mnist_m_domain(root, "test", size=32, channels=1), 2, 1, 32)


@pytest.mark.parametrize(
    "labels_text, message",
    [
        ("00000000.png 12\n", "reads '00000000.png 12'"),
        ("00000000.png\n", "reads '00000000.png'"),
        ("00000000.png 1\n00000000.png 2\n", "lists '00000000.png' twice"),
        ("missing.png 1\n", "missing.png' is listed in the labels file but missing"),
        ("../mnist_m_test/00000000.png 1\n", "not a file in the split's folder"),
        ("\n", "lists no images"),
    ],
)
def test_mnist_m_malformed_labels_file(mnist_m_root, labels_text, message):
    root = mnist_m_root[0]
    (root / "mnist_m" / "mnist_m_train_labels.txt").write_text(labels_text)
    with pytest.raises(DataError, match=message):
        mnist_m_domain(root, "train")


def test_mnist_m_missing_or_broken_files(mnist_m_root, tmp_path_factory):
    from PIL import Image

    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match=r"mnist_m_train_labels.txt' is missing.*mnist_m_\{train,test\}/\*.png"):
        mnist_m_domain(empty, "train")
    root = mnist_m_root[0]
    folder = root / "mnist_m" / "mnist_m_train"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "00000002.png")
    with pytest.raises(DataError, match="00000002.png' is 32 x 32 pixels.*share one size"):
        mnist_m_domain(root, "train")
    (folder / "00000002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="could not read the MNIST-M image .*00000002.png"):
        mnist_m_domain(root, "train")
    for png in folder.iterdir():
        png.unlink()
    folder.rmdir()
    with pytest.raises(DataError, match="mnist_m_train' is missing"):
        mnist_m_domain(root, "train")


# ---------------------------------------------------------------------------
# real MNIST under root (torchvision's layout, read by mtl.data.mnist)
# ---------------------------------------------------------------------------


def test_real_mnist_from_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(5).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = np.arange(8, dtype=np.uint8)
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, 8, 28, 28) + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 8) + labels.tobytes())
    domain = build_domain("mnist", "test", root=tmp_path)
    assert_common_format(domain, 8, 1, 28)
    torch.testing.assert_close(domain.images[:, 0], torch.from_numpy(images).float() / 255, rtol=0, atol=1e-7)
    assert domain.labels.tolist() == list(range(8))
    with pytest.raises(DataError, match="MNIST/raw"):
        build_domain("mnist", "train", root=tmp_path)  # the train files are absent


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------


def test_build_domain_names_defaults_and_errors(tmp_path):
    assert set(DOMAINS) == {"mnist", "uci_digits", "mnist_m_style", "usps", "svhn", "mnist_m"}
    assert build_domain("uci_digits", "test").channels == 1
    assert build_domain("MNIST-M-style", "test", size=32, seed=2).channels == 3  # own channels, name normalised
    assert build_domain("uci_digits", "test", root=tmp_path, channels=3).channels == 3  # root unused, no error
    listing = "mnist, uci_digits, mnist_m_style, usps, svhn, mnist_m"
    with pytest.raises(ConfigError, match=f"unknown domain 'mnistm'.*{listing}"):
        build_domain("mnistm", "train")
    for name in ("usps", "svhn", "mnist_m"):
        with pytest.raises(DataError, match=f"'{name}' has no embedded copy.*--data-root.*laid out as root/"):
            build_domain(name, "train")
    with pytest.raises(ConfigError, match="takes no option 'seed'; its options: verify_md5"):
        build_domain("usps", "train", root=tmp_path, seed=1)


def test_build_domain_reads_every_on_disk_domain(usps_root, svhn_root, mnist_m_root):
    for name, root, channels in (("usps", usps_root[0], 1), ("svhn", svhn_root[0], 3), ("mnist_m", mnist_m_root[0], 3)):
        domain = build_domain(name, "test", root=root, size=32)
        assert (domain.name, domain.channels, domain.size) == (name, channels, 32)


# ---------------------------------------------------------------------------
# compatibility and pairing
# ---------------------------------------------------------------------------


def digits(n, channels=1, size=8, seed=0, name="d"):
    gen = torch.Generator().manual_seed(seed)
    return DigitDomain(torch.rand(n, channels, size, size, generator=gen), torch.arange(n) % 10, name, "train")


class FiveClasses(Dataset):
    num_classes, channels, size, name = 5, 1, 8, "five"

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 8, 8), i % 5


def test_check_compatible_explains_the_fix():
    check_compatible(digits(3), digits(4))
    with pytest.raises(DataError, match="'grey' has 1-channel.*'colour' 3-channel.*channels=3 for both"):
        check_compatible(digits(3, name="grey"), digits(3, channels=3, name="colour"))
    with pytest.raises(DataError, match="8x8 images.*16x16.*same size"):
        check_compatible(digits(3), digits(3, size=16))
    with pytest.raises(DataError, match="10 classes and target 'five' 5.*class_mapping"):
        check_compatible(digits(3), FiveClasses())
    check_compatible(digits(3), FiveClasses(), class_mapping={0: 0, 1: 1, 7: 4})
    with pytest.raises(ConfigError, match="entry 7 -> 5"):
        check_compatible(digits(3), FiveClasses(), class_mapping={7: 5})


def test_paired_domains_cycle_the_shorter_domain_and_hide_target_labels():
    source, target = digits(7, seed=1, name="src"), digits(3, seed=2, name="tgt")
    paired = PairedDomains(source, target)
    assert len(paired) == 7 and len(PairedDomains(target, source)) == 7
    for i in range(7):
        item = paired[i]
        assert set(item) == {"source", "target"}
        x_s, y_s = item["source"]
        assert torch.equal(x_s, source.images[i]) and y_s == i % 10
        assert isinstance(item["target"], torch.Tensor) and torch.equal(item["target"], target.images[i % 3])
    assert torch.equal(paired[-1]["target"], target.images[0])
    with pytest.raises(IndexError):
        paired[7]
    # no public attribute of the pair or of its target view leads to the target labels
    assert isinstance(paired.target, Unlabelled) and not hasattr(paired.target, "labels")
    for obj in (paired, paired.target):
        public = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        assert all(v is not target and v is not target.labels for v in public.values())
    assert (paired.num_classes, paired.channels, paired.size) == (10, 1, 8)


def test_a_dataloader_over_paired_domains_gives_no_target_labels(usps_root, svhn_root):
    source = usps_domain(usps_root[0], "train", size=32, channels=3)  # 12 images
    target = svhn_domain(svhn_root[0], "test", size=32)  # 4 images
    loader = DataLoader(PairedDomains(source, target), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [len(b["target"]) for b in batches] == [5, 5, 2]
    seen_labels = []
    for batch in batches:
        assert set(batch) == {"source", "target"}
        x_s, y_s = batch["source"]
        assert x_s.shape == (len(y_s), 3, 32, 32) and y_s.dtype == torch.int64
        assert isinstance(batch["target"], torch.Tensor) and batch["target"].shape == (len(y_s), 3, 32, 32)
        for image in batch["target"]:  # every target entry is one of the target images
            assert any(torch.equal(image, t) for t in target.images)
        seen_labels += y_s.tolist()
    assert sorted(seen_labels) == sorted(source.labels.tolist())  # each source image once per epoch


def test_paired_domains_refuse_incompatible_or_empty_domains(mnist_train, mnist_m_style_train):
    with pytest.raises(DataError, match="channels=3 for both"):
        PairedDomains(mnist_train, mnist_m_style_train)
    PairedDomains(mnist_domain("test", channels=3), mnist_m_style_train)  # the suggested fix works

    class Empty(FiveClasses):
        num_classes = 10

        def __len__(self):
            return 0

    with pytest.raises(DataError, match="target domain is empty"):
        PairedDomains(digits(3), Empty())
