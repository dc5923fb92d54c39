"""scripts/continual_mnist.py end to end on the embedded Split-MNIST, and its bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("continual_mnist", ROOT / "scripts" / "continual_mnist.py")
continual_mnist = importlib.util.module_from_spec(spec)
sys.modules["continual_mnist"] = continual_mnist
spec.loader.exec_module(continual_mnist)

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--no-tensorboard"]


def test_compare_writes_one_table_with_acc_bwt_forgetting_and_wall_time(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert continual_mnist.main(["--compare", "--strategies", "finetune,er", "--seeds", "0,1", "--setting", "class",
                                 "--out", str(out), *FAST, "--batch-size", "32"]) == 0  # 25 steps per experience
    table = (out / "results.md").read_text()
    assert "| strategy | ACC (%) | BWT (%) | forgetting (%) | Task-IL ACC, same runs (%) | wall time (s) |" in table
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"finetune", "er"} and all(len(r) == 2 for r in rows.values())
    finetune_acc = sum(r["metrics"]["acc"] for r in rows["finetune"]) / 2
    replay_acc = sum(r["metrics"]["acc"] for r in rows["er"]) / 2
    assert finetune_acc < 0.3 < replay_acc  # Class-IL: fine-tuning keeps only the last pair of classes
    assert (out / "er" / "seed1" / "accuracy_matrix.png").stat().st_size > 0
    assert "experience 5/5 (er)" in capsys.readouterr().out


def test_resume_of_a_finished_run_keeps_its_results(tmp_path):
    out = tmp_path / "run"
    args = ["--strategy", "ewc", "--setting", "task", "--out", str(out), *FAST]
    assert continual_mnist.main(args) == 0
    first = json.loads((out / "accuracy_matrix.json").read_text())
    assert continual_mnist.main([*args, "--resume"]) == 0
    assert json.loads((out / "accuracy_matrix.json").read_text()) == first
    assert continual_mnist.main(args) == 2  # neither --resume nor --overwrite: refused, run untouched
    assert json.loads((out / "accuracy_matrix.json").read_text()) == first


@pytest.mark.parametrize("args, message", [
    (["--strategy", "er", "--buffer-size", "0"], "buffer size 0 cannot replay anything"),
    (["--scenario", "permuted", "--setting", "class"], "Class-IL"),
    (["--scenario", "rotated", "--dataset", "uci_digits"], "built for MNIST"),
    (["--compare", "--strategies", "finetune,sgd"], "unknown strategy(ies) ['sgd']"),
    (["--dataset", "cifar10"], "no embedded data"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    assert continual_mnist.main([*args, "--out", str(tmp_path / "x"), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_a_diverging_strategy_is_reported_and_does_not_stop_the_comparison(tmp_path, monkeypatch):
    from mtl.errors import NonFiniteLossError

    run_one = continual_mnist.run_one

    def flaky(args, name, seed, out):
        if name == "l2":
            raise NonFiniteLossError("penalty", 29, float("nan"), None)
        return run_one(args, name, seed, out)

    monkeypatch.setattr(continual_mnist, "run_one", flaky)
    out = tmp_path / "cmp"
    assert continual_mnist.main(["--compare", "--strategies", "l2,finetune", "--seeds", "0", "--setting", "task",
                                 "--out", str(out), *FAST, "--batch-size", "32"]) == 0  # 25 steps per experience
    table = (out / "results.md").read_text()
    assert "| l2 (1 of 1 runs diverged) | - |" in table and "| finetune | " in table
    # a single run still stops with the error
    assert continual_mnist.main(["--strategy", "l2", "--setting", "task", "--out", str(tmp_path / "one"),
                                 *FAST]) == 2
