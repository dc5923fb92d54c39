"""Atomic writes: the old file survives a failed write, and no temporary file is left."""

from __future__ import annotations

import os
import stat

import pytest

from mtl.io import atomic_write, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"accuracy": 0.9})

    def half_write(f):
        f.write(b'{"accur')
        raise KeyboardInterrupt  # the process is interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_write)
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"accuracy":0.9}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "a.json", [1])
    # like open(): 0666 less the umask (0644 usually), not mkstemp's owner-only 0600
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
