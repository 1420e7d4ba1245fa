"""The direct-synthesis U-Net baseline: masked loss, tiny training with ONNX export and parity,
exact resume, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import require

torch = require("torch")

from mris.training import profiles  # noqa: E402

from mris.fsutil import sha256_file  # noqa: E402

TINY = dataclasses.replace(profiles.PROFILES["quick"], name="tiny-unet", encoder_px=32, epochs=2, batch_size=8,
                           val_fraction=0.3)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from conftest import write_tiny_cohort

    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), subjects=8)


@pytest.fixture(autouse=True)
def _tiny_profile(monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "tiny-unet", TINY)


def test_masked_l1_matches_a_hand_computation():
    from mris.training.unet import masked_l1

    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.5, float("nan")], [1.0, 4.0]]]])
    # finite pixels: |1 - 1.5| + |3 - 1| + |4 - 4| = 2.5 over 3 pixels; the NaN pixel is ignored
    loss = masked_l1(pred, target)
    assert math.isclose(float(loss), 2.5 / 3, rel_tol=1e-6)
    pred.requires_grad_(True)
    masked_l1(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[0, 0, 0, 1]) == 0.0


def test_map_to_target_keeps_the_mask():
    from mris.training.unet import map_to_target

    from mris.constants import PreprocessConfig

    thickness = np.full((64, 64), np.nan, np.float32)
    thickness[16:48, 16:48] = 2.0
    target = map_to_target(thickness, PreprocessConfig(encoder_px=32))
    assert target.shape == (32, 32)
    inside = np.isfinite(target)
    assert inside[16, 16] and not inside[0, 0]
    np.testing.assert_allclose(target[inside], 2.0, atol=1e-5)  # edges do not blend towards 0


def test_tiny_unet_trains_exports_with_parity_and_the_cli_runs(tiny_cohort, tmp_path):
    import onnxruntime as ort
    from typer.testing import CliRunner

    from mris.cli import app

    out = tmp_path / "unet"
    result = CliRunner().invoke(app, ["train-unet", "--manifest", str(tiny_cohort), "--out", str(out),
                                      "--profile", "tiny-unet", "--threads", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "unet-card.json").read_text())
    assert card["sha256"]["unet.onnx"] == sha256_file(out / "unet.onnx")
    assert card["preprocess"]["encoder_px"] == 32 and card["profile"]["epochs"] == 2
    assert card["metrics"]["parity_max_abs_diff"] <= 1e-4
    assert math.isfinite(card["metrics"]["validation"]["val_mae_mm"])
    assert card["metrics"]["best_epoch"] in (1, 2)
    assert (out.parent / "unet.training" / "last.pt").is_file() and (out.parent / "unet.training" / "best.pt").is_file()
    session = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["thickness"]
    y = session.run(["thickness"], {"image": np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)})[0]
    assert y.shape == (3, 2, 32, 32) and np.isfinite(y).all()

    # --resume on the finished run re-exports the same best model; a different profile is refused
    from mris.errors import BadParameter
    from mris.training.unet import UnetRequest, train_unet

    again = train_unet(UnetRequest(manifest=tiny_cohort, out=out, profile="tiny-unet", threads=2, device="cpu",
                                   resume=True))
    assert again["best_epoch"] == card["metrics"]["best_epoch"]
    assert again["validation"] == card["metrics"]["validation"]
    with pytest.raises(BadParameter, match="different profile"):
        train_unet(UnetRequest(manifest=tiny_cohort, out=out, profile="tiny-unet", epochs=3, threads=2,
                               device="cpu", resume=True))


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path):
    from mris.training.trainer import set_determinism
    from mris.training.unet import UnetData, UnetTrainer

    rng = np.random.default_rng(0)
    targets = rng.random((20, 2, 32, 32), dtype=np.float32) * 3
    targets[:, :, :4] = np.nan
    data = UnetData(rng.random((20, 32, 32), dtype=np.float32), targets, list(range(16)), list(range(16, 20)))
    profile = dataclasses.replace(TINY, epochs=2, batch_size=6, step_size=1)

    def make(folder: str) -> UnetTrainer:
        set_determinism(0, threads=1)
        return UnetTrainer(data, profile, tmp_path / folder, torch.device("cpu"), seed=0, width=4, log=lambda m: None)

    straight = make("a")
    straight.fit()
    interrupted = make("b")
    interrupted.fit(stop_after_epoch=1)
    resumed = make("b")
    resumed.fit(resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value.float(), resumed.model.state_dict()[key].float(), atol=1e-6, rtol=0), key
    assert [r["loss_mm"] for r in straight.history] == pytest.approx([r["loss_mm"] for r in resumed.history], abs=1e-6)
    assert resumed.scheduler.state_dict()["last_epoch"] == 2
    assert resumed.best_epoch == straight.best_epoch
