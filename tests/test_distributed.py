"""Every weighting gives the same update on 2 processes as on 1 with the same global batch.

Two real processes (torchrun, gloo, CPU), as DESIGN.md says `accelerate launch --cpu`
would run only one here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_processes

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(tmp_path, processes: int, name: str, precision: str = "no"):
    out = tmp_path / f"{name}.pt"
    args = ["--batch-size", str(16 // processes), "--global-batch", "16", "--steps", "4",
            "--mixed-precision", precision, "--out", str(out)]
    return run_processes(WORKER, args, processes, out, port_base=29500)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return run_worker(tmp, 1, "one"), run_worker(tmp, 2, "two")


@pytest.mark.parametrize("name", ["equal", "uncertainty", "gradnorm", "mgda", "mgda_ub"])
def test_two_processes_match_one(runs, name):
    one, two = runs[0][name], runs[1][name]
    assert torch.tensor(one["weights"]) == pytest.approx(torch.tensor(two["weights"]), abs=1e-5)
    assert torch.tensor(one["losses"]) == pytest.approx(torch.tensor(two["losses"]), abs=1e-5)
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], atol=1e-5), f"{name}: {key} differs"
    for key, value in one["weighting"].items():
        assert torch.allclose(value, two["weighting"][key], atol=1e-5), f"{name}: weighting {key} differs"
    if name != "equal":  # the check has teeth: each method's update differs from the plain sum's
        assert not torch.allclose(one["model"]["encoder.fc.weight"], runs[0]["equal"]["model"]["encoder.fc.weight"],
                                  atol=1e-4)
