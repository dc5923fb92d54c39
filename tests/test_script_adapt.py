"""scripts/adapt_digits.py end to end on the embedded domains, and its bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("adapt_digits", ROOT / "scripts" / "adapt_digits.py")
adapt_digits = importlib.util.module_from_spec(spec)
sys.modules["adapt_digits"] = adapt_digits
spec.loader.exec_module(adapt_digits)

TINY = ["--train-size", "96", "--epochs", "1", "--batch-size", "32", "--no-progress", "--no-tensorboard"]


def test_one_method_writes_its_table_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert adapt_digits.main(["--method", "dann", "--source", "mnist", "--target", "uci_digits", "--out", str(out),
                              *TINY]) == 0
    printed = capsys.readouterr().out
    assert "mnist -> uci_digits, target test accuracy (%): 96 source / 96 target training images, " \
           "359 target test images" in printed
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["method"] == "dann" and 0.0 <= row["accuracy"] <= 100.0
    # one epoch: the epoch the validator picks is the last one
    assert row["im_selected_accuracy"] == row["accuracy"]
    validation = json.loads((out / "history.json").read_text())["epochs"][-1]["validation"]
    assert set(validation) == {"entropy", "information_maximization"}
    assert validation["entropy"] <= 0.0 <= validation["information_maximization"] <= 2.31  # log(10)
    assert (out / "features.png").stat().st_size > 0
    assert (out / "checkpoints" / "last.pt").is_file()


def test_compare_gives_mean_and_std_over_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert adapt_digits.main(["--compare", "--methods", "source_only,coral", "--seeds", "0,1", "--source",
                              "uci_digits", "--target", "mnist", "--out", str(out), *TINY]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["source_only", "coral"]
    assert all(len(r["per_seed"]) == 2 for r in rows)
    assert "| source_only | " in capsys.readouterr().out and " ± " in (out / "results.md").read_text()
    assert (out / "coral" / "seed1" / "history.json").is_file()


def test_adda_trains_source_only_first_then_adapts(tmp_path, capsys):
    out = tmp_path / "adda"
    assert adapt_digits.main(["--method", "adda", "--source", "uci_digits", "--target", "mnist", "--out", str(out),
                              *TINY]) == 0
    stage1 = json.loads((out / "stage1" / "history.json").read_text())
    stage2 = json.loads((out / "history.json").read_text())
    assert stage1["losses"] == ["classification"] and stage2["losses"] == ["discriminator", "adversarial"]
    assert json.loads((out / "results.json").read_text())["rows"][0]["method"] == "adda"


def test_compare_starts_adda_from_the_same_seeds_source_only_run(tmp_path, monkeypatch):
    started_from = []
    build_adda = adapt_digits.build_adda
    monkeypatch.setattr(adapt_digits, "build_adda",
                        lambda stage1, **o: started_from.append(stage1) or build_adda(stage1, **o))
    trained = []
    fit = adapt_digits.fit
    monkeypatch.setattr(adapt_digits, "fit", lambda *a: trained.append(a[1]) or fit(*a))
    out = tmp_path / "cmp"
    assert adapt_digits.main(["--compare", "--methods", "source_only,adda", "--seeds", "0", "--source",
                              "uci_digits", "--target", "mnist", "--out", str(out), *TINY]) == 0
    assert trained == ["source_only", "adda"]  # no second source_only stage
    assert not (out / "adda" / "seed0" / "stage1").exists()
    source_weights = torch.load(out / "source_only" / "seed0" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, source_weights[k]) for k, v in started_from[0].state_dict().items())


def test_cycada_runs_its_four_stages(tmp_path):
    out = tmp_path / "cycada"
    assert adapt_digits.main(["--method", "cycada", "--source", "mnist", "--target", "mnist_m_style", "--out",
                              str(out), *TINY]) == 0
    pixel = json.loads((out / "pixel" / "history.json").read_text())
    assert pixel["losses"] == ["generator_gan", "cycle", "semantic", "discriminator"]
    for stage in ("stage1", "translated"):
        assert json.loads((out / stage / "history.json").read_text())["losses"] == ["classification"]
    assert json.loads((out / "history.json").read_text())["losses"] == ["discriminator", "adversarial"]


def test_colour_target_makes_both_domains_three_channels():
    args = adapt_digits.parse_args(["--source", "mnist", "--target", "mnist_m_style"])
    assert args.channels == 3
    assert adapt_digits.parse_args(["--source", "mnist", "--target", "uci_digits"]).channels == 1


@pytest.mark.parametrize("args, message", [
    (["--source", "mnist", "--target", "mnist"], "adaptation needs two domains"),
    (["--compare", "--methods", "dann,adabn"], "unknown method(s) ['adabn']"),
    (["--train-size", "0"], "a subset of 0 is not possible"),
    (["--target", "usps"], "--data-root"),
])
def test_bad_input(tmp_path, capsys, args, message):
    assert adapt_digits.main(["--out", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()
