"""Checkpoints: one file, written atomically, loaded without running code from it.

A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)``,
which accepts tensors and plain containers only, so everything saved here (RNG
states included) is converted to those.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write

FORMAT = "multisup-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def resolve(path: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file, with a clear error if there is none."""
    path = Path(path)
    if path.is_dir():
        found = checkpoint_path(path)
        if not found.is_file():
            raise CheckpointError(
                f"no checkpoint in '{path}' (expected {found}). Resume from a run folder that a training "
                "run wrote, or start a new run without --resume."
            )
        return found
    if not path.is_file():
        raise CheckpointError(f"resume path '{path}' does not exist; pass a run folder or a checkpoint file.")
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = resolve(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a safe checkpoint of this library ({first_line}). "
            "Resume from another run folder or start a new run."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this library (format {FORMAT} expected).")
    return data


def compare_fingerprints(saved: dict, current: dict, path) -> None:
    """Raise a CheckpointError listing what differs between a checkpoint's run and this one."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint has {a.get(key)!r}, this run has {b.get(key)!r}")
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"checkpoint '{path}' belongs to a different model or configuration: {shown}. "
            "Resume with the options of the original run (see its config.json), or start a new run."
        )


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in module.state_dict().items() if torch.is_tensor(t)}


def capture_rng() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    return value.item() if hasattr(value, "item") else value
