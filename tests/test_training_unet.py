"""The direct-synthesis baselines (U-Net, pix2pix): the published architecture and its receptive
field, the encoders' sampler and step count, masked loss, tiny training with ONNX export and
parity, exact resume, the CLI, pix2pix end to end into the evaluation's method."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require

torch = require("torch")

from mris.fsutil import sha256_file  # noqa: E402
from mris.training import profiles  # noqa: E402

TINY = dataclasses.replace(
    profiles.PROFILES["quick"],
    name="tiny-unet",
    encoder_px=32,
    epochs=2,
    batch_size=8,
    val_fraction=0.3,
)


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
    from mris.constants import PreprocessConfig
    from mris.training.unet import map_to_target

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
    result = CliRunner().invoke(
        app,
        [
            "train-unet",
            "--manifest",
            str(tiny_cohort),
            "--out",
            str(out),
            "--profile",
            "tiny-unet",
            "--threads",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "unet-card.json").read_text())
    assert card["sha256"]["unet.onnx"] == sha256_file(out / "unet.onnx")
    assert card["preprocess"]["encoder_px"] == 32 and card["profile"]["epochs"] == 2
    assert card["metrics"]["parity_max_abs_diff"] <= 1e-4
    assert math.isfinite(card["metrics"]["validation"]["val_mae_mm"])
    assert card["metrics"]["best_epoch"] in (1, 2)
    assert (out.parent / "unet.training" / "last.pt").is_file() and (
        out.parent / "unet.training" / "best.pt"
    ).is_file()
    session = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["thickness"]
    y = session.run(
        ["thickness"], {"image": np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)}
    )[0]
    assert y.shape == (3, 2, 32, 32) and np.isfinite(y).all()

    # --resume on the finished run re-exports the same best model; a different profile is refused
    from mris.errors import BadParameter
    from mris.training.unet import UnetRequest, train_unet

    again = train_unet(
        UnetRequest(
            manifest=tiny_cohort, out=out, profile="tiny-unet", threads=2, device="cpu", resume=True
        )
    )
    assert again["best_epoch"] == card["metrics"]["best_epoch"]
    assert again["validation"] == card["metrics"]["validation"]
    with pytest.raises(BadParameter, match="different profile"):
        train_unet(
            UnetRequest(
                manifest=tiny_cohort,
                out=out,
                profile="tiny-unet",
                epochs=3,
                threads=2,
                device="cpu",
                resume=True,
            )
        )


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path):
    from mris.training.trainer import set_determinism
    from mris.training.unet import UnetData, UnetTrainer

    rng = np.random.default_rng(0)
    targets = rng.random((20, 2, 32, 32), dtype=np.float32) * 3
    targets[:, :, :4] = np.nan
    data = UnetData(
        rng.random((20, 32, 32), dtype=np.float32),
        targets,
        list(range(16)),
        list(range(16, 20)),
        [f"knee{i}" for i in range(16)],
    )
    profile = dataclasses.replace(TINY, epochs=2, batch_size=6, step_size=1)

    def make(folder: str) -> UnetTrainer:
        set_determinism(0, threads=1)
        return UnetTrainer(
            data,
            profile,
            tmp_path / folder,
            torch.device("cpu"),
            seed=0,
            width=4,
            log=lambda m: None,
        )

    straight = make("a")
    straight.fit()
    interrupted = make("b")
    interrupted.fit(stop_after_epoch=1)
    resumed = make("b")
    resumed.fit(resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(
            value.float(), resumed.model.state_dict()[key].float(), atol=1e-6, rtol=0
        ), key
    assert [r["loss_mm"] for r in straight.history] == pytest.approx(
        [r["loss_mm"] for r in resumed.history], abs=1e-6
    )
    assert resumed.scheduler.state_dict()["last_epoch"] == 2
    assert resumed.best_epoch == straight.best_epoch


def test_the_paper_unet_is_the_published_architecture():
    from mris.training.models import ThicknessUNet, unet_features

    assert (
        profiles.PROFILES["paper"].unet_width == 64 and profiles.PROFILES["quick"].unet_width == 16
    )
    assert unet_features(64) == (
        64,
        128,
        256,
        512,
        1024,
        64,
    )  # 4 down-samplings, 64 doubling to 1024
    model = ThicknessUNet(64)
    downs = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(downs) == 4
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(c.out_channels for c in convs) == 1024 and convs[0].out_channels == 64
    parameters = sum(p.numel() for p in model.parameters())
    assert 31.0e6 < parameters < 31.2e6, parameters  # Ronneberger et al.: about 31 M


def _receptive_extent(model, side: int, pixel: tuple[int, int]) -> tuple[int, int]:
    """First and last input row whose value changes output ``pixel`` of channel 0."""
    x = torch.rand(1, 1, side, side, requires_grad=True)
    model(x)[0, 0, pixel[0], pixel[1]].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(dim=1) > 0).flatten()
    return int(rows.min()), int(rows.max())


def test_the_unet_receptive_field_by_gradient():
    from mris.training.models import ThicknessUNet

    torch.manual_seed(0)
    model = ThicknessUNet(2).eval()  # the receptive field does not depend on the width
    # arithmetic of the padded 4-level U-Net: 188 px, centred (+-94) on the output pixel
    low, high = _receptive_extent(model, 256, (128, 128))
    assert (low, high) == (34, 221) and high - low + 1 == 188
    # at 256 px the centre pixel sees 73 % of the side; an output pixel sees the ROI centre
    # (the joint) only within 94 px of it: the corner does not
    assert _receptive_extent(model, 256, (0, 0))[1] < 128
    # the quick profile's 64 px: every output pixel, the corner included, sees the whole input
    assert _receptive_extent(model, 64, (0, 0)) == (0, 63)
    assert _receptive_extent(model, 64, (63, 63)) == (0, 63)


def test_one_visit_per_knee_per_epoch_and_the_encoders_steps(tmp_path):
    from mris.training.sampler import KneeVisitSampler
    from mris.training.trainer import RegionData, RegionTrainer
    from mris.training.unet import Pix2PixTrainer, UnetData, UnetTrainer

    rng = np.random.default_rng(1)
    knees = [f"knee{i // 3}" for i in range(24)]  # 8 knees, 3 visits each: batches of 3, 3 and 2
    images = rng.random((27, 32, 32), dtype=np.float32)
    targets = rng.random((27, 2, 32, 32), dtype=np.float32)
    data = UnetData(images, targets, list(range(24)), [24, 25, 26], knees)
    profile = dataclasses.replace(TINY, epochs=2, batch_size=3, augment=False)
    unet = UnetTrainer(
        data, profile, tmp_path / "u", torch.device("cpu"), seed=3, width=2, log=lambda m: None
    )
    encoders = RegionTrainer(
        "separate-fc",
        RegionData(images, images, list(range(24)), knees, [24, 25, 26]),
        profile,
        tmp_path / "e",
        torch.device("cpu"),
        seed=3,
        log=lambda m: None,
    )
    for epoch in range(2):
        unet.epoch = encoders.epoch = epoch
        batches = unet.batches()
        drawn = [knees[r] for batch in batches for r in batch]
        assert sorted(drawn) == sorted(set(knees))  # every knee once: one visit per knee
        encoders.sampler.set_epoch(epoch)
        assert batches == [list(b) for b in encoders.sampler]  # the encoders' very batches
    unet.epoch = 0
    unet.fit()
    gan = Pix2PixTrainer(
        data,
        dataclasses.replace(profile, epochs=1),
        tmp_path / "g",
        torch.device("cpu"),
        seed=3,
        width=2,
        log=lambda m: None,
    )
    gan.fit()
    per_epoch = len(KneeVisitSampler(knees, 3, 3))
    assert per_epoch == 3 and unet.steps_per_epoch == per_epoch
    assert unet.steps == 2 * per_epoch and gan.steps == per_epoch
    # the optimisers took exactly those steps (Adam counts them per parameter)
    first = next(iter(unet.model.parameters()))
    assert int(unet.optimizer.state[first]["step"]) == 2 * per_epoch
    assert (
        int(gan.optimizer_d.state[next(iter(gan.discriminator.parameters()))]["step"]) == per_epoch
    )


def test_pix2pix_trains_resumes_and_predicts_masked_maps(tiny_cohort, tmp_path):
    from typer.testing import CliRunner

    from mris.cli import app
    from mris.evaluation.methods import UnetMethod
    from mris.training.unet import UnetRequest, train_unet

    out = tmp_path / "pix2pix"
    args = [
        "train-pix2pix",
        "--manifest",
        str(tiny_cohort),
        "--out",
        str(out),
        "--profile",
        "tiny-unet",
        "--epochs",
        "1",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--width",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "pix2pix-card.json").read_text())
    assert card["kind"] == "pix2pix" and card["sha256"]["pix2pix.onnx"] == sha256_file(
        out / "pix2pix.onnx"
    )
    assert (
        card["architecture"]["generator"]["levels"] == 4
        and card["architecture"]["discriminator"]["patch_px"] == 16
    )
    assert card["optimiser_steps"]["total"] == card["metrics"]["optimiser_steps"] > 0
    assert "width 4 at 32 px" in card["width_note"] and "paper: 64" in card["width_note"]
    assert card["metrics"]["parity_max_abs_diff"] <= 1e-4
    state = torch.load(out.parent / "pix2pix.training" / "last.pt", weights_only=False)
    assert {"discriminator", "optimizer_d", "scheduler_d"} <= set(state)

    # one more epoch by --resume continues the run (the D state comes back, the steps add up)
    metrics = train_unet(
        UnetRequest(
            manifest=tiny_cohort,
            out=out,
            profile="tiny-unet",
            epochs=1,
            threads=2,
            device="cpu",
            width=4,
            gan=True,
            resume=True,
        )
    )
    assert (
        metrics["optimiser_steps"] == card["metrics"]["optimiser_steps"]
    )  # finished: nothing retrained
    assert (
        CliRunner().invoke(app, [*args[:-2], "--width", "8", "--resume"]).exit_code != 0
    )  # another width

    # the evaluation's method: maps on the atlas grid, NaN outside the atlas mask
    atlas = {name: np.zeros((40, 40), bool) for name in ("fc", "tc")}
    atlas["fc"][5:30, 5:30] = True
    atlas["tc"][10:20, :] = True
    method = UnetMethod(out, atlas, device="cpu", threads=1, card="pix2pix-card.json")
    # UnetMethod reads only the ROI's image (the rest of KneeRoi is where it came from)
    rois = [
        SimpleNamespace(image=np.random.default_rng(i).random((32, 32), dtype=np.float32))
        for i in range(3)
    ]
    maps = method.predict(rois)
    for name in ("fc", "tc"):
        assert maps[name].shape == (3, 40, 40)
        assert (
            np.isnan(maps[name][:, ~atlas[name]]).all()
            and np.isfinite(maps[name][:, atlas[name]]).all()
        )
