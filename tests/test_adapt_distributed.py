"""Adaptation methods whose losses are means over samples give the same update on 2 processes as on 1.

(MMD, CORAL and DSN's losses are statistics of the whole batch, so like batch-norm they
see each process's share only and are not expected to match.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_processes

WORKER = Path(__file__).with_name("adapt_ddp_worker.py")


def run_worker(tmp_path, processes: int):
    out = tmp_path / f"{processes}.pt"
    return run_processes(WORKER, ["--batch-size", str(16 // processes), "--out", str(out)], processes, out,
                         port_base=29600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt_ddp")
    return run_worker(tmp, 1), run_worker(tmp, 2)


@pytest.mark.parametrize("name", ["source_only", "dann"])
def test_two_processes_match_one(runs, name):
    one, two = runs[0][name], runs[1][name]
    assert torch.tensor(one["losses"]) == pytest.approx(torch.tensor(two["losses"]), abs=1e-5)
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], atol=1e-5), f"{name}: {key} differs"
    start = runs[0]["source_only"]["model"]["encoder.fc.weight"]
    if name == "dann":  # the check has teeth: the domain loss changes the encoder's update
        assert not torch.allclose(one["model"]["encoder.fc.weight"], start, atol=1e-4)
