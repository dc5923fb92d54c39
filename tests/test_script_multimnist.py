"""scripts/train_multimnist.py end to end: outputs, table, resume and every bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_data import write_split

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_multimnist.py"
SMALL = ["--train-pairs", "1200", "--test-pairs", "400", "--epochs", "3", "--batch-size", "64", "--lr", "0.002",
         "--no-progress"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_multimnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


script = load_script()


def run(*args) -> int:
    return script.main([str(a) for a in args])


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--weighting", "--static-weights", "--data-root", "--resume", "--single-task-baselines",
                   "--mixed-precision", "--checkpoint-every", "--on-nonfinite"):
        assert option in out


def test_full_run_writes_the_run_folder_and_beats_chance(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", out, *SMALL, "--single-task-baselines") == 0
    printed = capsys.readouterr().out
    assert "| multi-task (equal) |" in printed and "| single-task baselines |" in printed
    results = json.loads((out / "results.json").read_text())
    mtl_row, single_row = results["rows"]
    for acc in (*mtl_row["accuracy"].values(), *single_row["accuracy"].values()):
        assert acc > 25.0  # chance is 10%; the demo defaults reach 85-90% (see the slow test)
    assert results["peak_rss_mib"] > 0
    for name in ("config.json", "history.json", "results.md", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for task in ("left", "right"):
        history = json.loads((out / "baselines" / task / "history.json").read_text())
        assert history["tasks"] == [task]
    assert (out / "results.md").read_text().strip() in printed


def test_static_weighting_records_its_weights(tmp_path):
    out = tmp_path / "run"
    assert run("--out", out, *SMALL, "--epochs", "1", "--weighting", "static", "--static-weights", "left=1,right=0.25") == 0
    history = json.loads((out / "history.json").read_text())
    assert history["epochs"][0]["weights"] == {"left": 1.0, "right": 0.25}


def test_resume_continues_a_run_and_refuses_a_changed_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--out", out, *SMALL, "--epochs", "1") == 0
    assert run("--out", out, *SMALL, "--epochs", "1") == 2  # no silent overwrite
    assert "already holds a run" in capsys.readouterr().err
    checkpoint = (out / "checkpoints" / "last.pt").read_bytes()
    assert run("--out", out, *SMALL, "--epochs", "1", "--lr", "0.01", "--resume") == 2
    assert "config.lr: checkpoint has 0.002, this run has 0.01" in capsys.readouterr().err
    assert run("--out", out, *SMALL, "--epochs", "1", "--train-pairs", "1000", "--resume") == 2
    assert "run.train_pairs" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert run("--out", out, *SMALL, "--epochs", "1", "--resume") == 0  # a finished run: nothing to do
    assert (out / "checkpoints" / "last.pt").read_bytes() != b""


def test_resume_of_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run("--out", tmp_path / "empty", *SMALL, "--resume") == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_real_mnist_folder_in_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 100)):
        write_split(tmp_path / "data", split, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, n, dtype=np.uint8))
    out = tmp_path / "run"
    assert run("--out", out, "--data-root", tmp_path / "data", "--train-pairs", "64", "--test-pairs", "32",
               "--epochs", "1", "--batch-size", "32", "--no-progress") == 0
    assert "MNIST from" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--weighting", "static", "--static-weights", "left=1,middle=2"], "unknown task(s) ['middle']"),
    (["--weighting", "static", "--static-weights", "left=1,right=-2"], "must be finite and >= 0"),
    (["--weighting", "static", "--static-weights", "left=1,right"], "cannot read static weight 'right'"),
    (["--weighting", "static"], "needs --static-weights"),
    (["--static-weights", "left=1,right=1"], "only applies to --weighting static"),
    (["--encoder", "vgg99"], "unknown encoder 'vgg99'"),
    (["--data-root", "/nonexistent/mnist"], "does not exist"),
    (["--train-pairs", "0"], "must be positive"),
    (["--train-pairs", "40", "--batch-size", "64"], "batch size 64 is larger than the training set (40 samples)"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--mixed-precision", "fp16", "--cpu"], "fp16 mixed precision needs a CUDA GPU"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert run("--out", out, *SMALL, *args) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_data_root_not_in_torchvision_layout(tmp_path, capsys):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    assert run("--out", tmp_path / "run", *SMALL, "--data-root", tmp_path / "data") == 2
    assert "not in torchvision's MNIST layout" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_weighting_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--weighting", "magic")
    assert exit_.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run("--out", tmp_path / "file" / "run", *SMALL) == 2
    assert "not writable" in capsys.readouterr().err


def test_runs_under_accelerate_launch(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(SCRIPT), "--out", str(tmp_path / "run"), "--train-pairs", "256",
         "--test-pairs", "64", "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| multi-task (equal) |" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_demo_defaults_beat_chance_by_far(tmp_path):
    assert run("--out", tmp_path / "run", "--no-progress") == 0
    accuracy = json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]["accuracy"]
    assert accuracy["left"] > 80.0 and accuracy["right"] > 80.0


TINY = ["--train-pairs", "256", "--test-pairs", "64", "--epochs", "1", "--batch-size", "64", "--no-progress",
        "--no-tensorboard"]


def test_compare_writes_one_table_with_mean_and_std_and_a_weight_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run("--out", out, *TINY, "--compare", "--methods", "equal,mgda_ub,gradnorm,cross_stitch",
               "--seeds", "0,1") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    labels = [r["model"] for r in results["rows"]]
    assert labels == ["single-task baselines", "equal", "mgda_ub", "gradnorm", "cross_stitch"]
    for row in results["rows"]:
        for task in ("left", "right"):
            values = row["per_seed"][task]
            assert len(values) == 2
            assert row["accuracy"][task] == pytest.approx(sum(values) / 2)
    assert "| mgda_ub | " in printed and " ± " in printed
    assert (out / "weights.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "mgda_ub" / "seed1" / "checkpoints" / "last.pt").is_file()
    mgda = json.loads((out / "mgda_ub" / "seed0" / "history.json").read_text())
    assert all(sum(s["weights"].values()) == pytest.approx(1.0, abs=1e-5) for s in mgda["steps"])


def test_patches_architecture_runs_on_an_encoder_with_batchnorm(tmp_path):
    out = tmp_path / "run"
    assert run("--out", out, *TINY, "--architecture", "patches", "--encoder", "resnet18", "--weighting", "mgda") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["architecture"] == "patches"
    report = json.loads((out / "parameters.json").read_text())
    # ResNet-18's BatchNorm layers (9,600 scale and bias values) are each task's patch
    assert report["tasks"]["left"]["patch"] == report["tasks"]["right"]["patch"] == 9600
    assert report["tasks"]["left"]["head"] == 512 * 50 + 50 + 50 * 10 + 10


@pytest.mark.parametrize("args, message", [
    (["--compare", "--methods", "equal,pcgrad"], "unknown method 'pcgrad'"),
    (["--compare", "--seeds", "0,x"], "cannot read --seeds"),
    (["--compare", "--seeds", "1,1"], "distinct integers"),
    (["--weighting", "mgda_ub", "--architecture", "cross_stitch"], "mgda_ub needs one shared representation"),
    (["--architecture", "patches", "--patch-type", "depthwise"], "depthwise"),
    (["--weighting", "gradnorm", "--gradnorm-alpha", "-1"], "alpha must be >= 0"),
])
def test_bad_method_input(tmp_path, capsys, args, message):
    assert run("--out", tmp_path / "run", *TINY, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()
