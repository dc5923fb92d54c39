"""Every weighting trains through the Trainer, in fp32 and bf16, and records valid weights."""

from __future__ import annotations

import math

import pytest

from conftest import TwoTaskDigits, make_trainer

NAMES = ["equal", "uncertainty", "gradnorm", "mgda", "mgda_ub"]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_weighting_trains_and_records_weights(tmp_path, name, precision):
    t = make_trainer(tmp_path, weighting=name, mixed_precision=precision, epochs=4, log_every=1,
                     train=TwoTaskDigits(320, seed=1), test=TwoTaskDigits(100, seed=2))
    history = t.fit()
    last = history["epochs"][-1]
    assert all(math.isfinite(v) for v in last["train_loss"].values())
    assert last["train_loss"]["a"] < history["epochs"][0]["train_loss"]["a"]
    assert max(last["eval"]["a"]["accuracy"], last["eval"]["b"]["accuracy"]) > 0.3  # chance: 0.1
    steps = history["steps"]
    assert len(steps) == 80
    for record in steps:
        w = list(record["weights"].values())
        assert all(math.isfinite(x) and x >= 0 for x in w)
        if name.startswith("mgda"):
            assert sum(w) == pytest.approx(1.0, abs=1e-5)  # a point of the simplex
        if name == "gradnorm":
            assert sum(w) == pytest.approx(2.0, abs=1e-4)  # renormalised to T


def test_mgda_ub_in_bf16_sees_the_representation_the_heads_used(tmp_path):
    """Accelerate returns float32 copies of bf16 outputs; the weights must still come from real gradients."""
    t = make_trainer(tmp_path, weighting="mgda_ub", mixed_precision="bf16", epochs=1, log_every=1)
    history = t.fit()
    weights = [s["weights"]["a"] for s in history["steps"]]
    assert all(0.0 < w < 1.0 for w in weights), weights  # (1, 0) would mean zero gradients w.r.t. z
