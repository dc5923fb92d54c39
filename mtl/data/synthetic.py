"""Small generated data sets written in the real on-disk formats, for the scripts' --smoke mode.

They exercise the same loaders as real data (file layout, dtypes, validation), so a
smoke run checks the whole path end to end in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def write_nyuv2(root: str | Path, n_train: int = 4, n_val: int = 2, height: int = 288, width: int = 384,
                seed: int = 0) -> Path:
    """``root/{train,val}/{image,label,depth,normal}/{i}.npy`` as in the mtan/LibMTL preprocessing."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("image", "label", "depth", "normal"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = rng.integers(-1, 13, (height, width)).astype(np.float32)
            depth = rng.uniform(0.5, 10.0, (height, width, 1)).astype(np.float32)
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            depth[: height // 8] = 0.0  # invalid pixels, as the real data has
            normal[: height // 8] = 0.0
            np.save(root / split / "image" / f"{i}.npy", rng.uniform(0, 1, (height, width, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", depth)
            np.save(root / split / "normal" / f"{i}.npy", normal)
    return root


def write_celeba(root: str | Path, n: int = 12, height: int = 218, width: int = 178, seed: int = 0) -> Path:
    """``root/celeba/img_align_celeba/*.jpg`` with ``list_attr_celeba.txt`` and ``list_eval_partition.txt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=90)
    attrs = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    splits = [0 if i < n // 2 else (1 if i < 3 * n // 4 else 2) for i in range(n)]
    (folder / "list_eval_partition.txt").write_text("".join(f"{a} {s}\n" for a, s in zip(names, splits)))
    return Path(root)
