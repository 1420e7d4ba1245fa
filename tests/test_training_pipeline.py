"""Training end to end on a tiny synthetic cohort: cache, localiser, encoders, ONNX export with
parity, the model bundle; exact resume; cache rebuild on a changed constant."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import require

torch = require("torch")

from tiny_training import TINY, any_confidence_copy  # noqa: E402

from mris.constants import PREPROCESSING_VERSION, PreprocessConfig  # noqa: E402
from mris.errors import KneeNotFound, ManifestError  # noqa: E402
from mris.manifest import read_manifest, write_manifest  # noqa: E402
from mris.model_bundle import load_model_bundle  # noqa: E402
from mris.training import profiles  # noqa: E402


@pytest.fixture(autouse=True)
def _small_cohort_spacing(monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "tiny", TINY)


def test_tiny_training_writes_a_verified_bundle_with_parity(trained):
    out, summary = trained
    bundle = load_model_bundle(out)  # checks every sha256
    card = bundle.card
    assert set(card.variants) == {"separate", "combined"}
    assert set(card.variants["separate"].regions) == {"fc", "tc"}
    assert card.variants["combined"].regions["combined"].thickness_input_px == (64, 32)
    assert card.preprocess_config == PreprocessConfig(encoder_px=32)
    assert card.preprocessing_version == PREPROCESSING_VERSION
    assert card.training["profile"]["augmentation"] == TINY.augmentation
    assert card.localiser is not None and card.localiser.file == "localiser.onnx"
    assert {"torch", "onnxruntime", "onnx"} <= set(card.versions)
    for name, region in summary["regions"].items():
        parity = region["parity"]
        assert max(parity["max_abs_diff_radiograph"], parity["max_abs_diff_thickness"]) <= 1e-4, (
            name
        )
        assert parity["top20_order_mismatches"] == 0
    assert (out / "curves.png").is_file() and (out / "log.csv").is_file()


def test_onnx_encoder_matches_the_contract(trained, tiny_cohort):
    from mris.encoders import OnnxEncoder

    out, _ = trained
    encoder = OnnxEncoder(out / "separate-fc-radiograph.onnx", device="cpu", intra_op_threads=1)
    assert encoder.input_name == "image" and encoder.input_px == (32, 32)
    emb = encoder.embed(np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32))
    assert emb.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_localiser_finds_knees_and_refuses_noise(trained, tiny_cohort):
    from mris.dicom import Radiograph, read_radiograph
    from mris.localiser import KneeLocaliser, locate_knees

    out, _ = trained
    localiser = KneeLocaliser.from_bundle(out, threads=1)
    manifest = read_manifest(tiny_cohort)
    row = manifest.rows[0]
    radiograph = read_radiograph(manifest.resolve_path(row.radiograph_path))
    found = localiser.locate(radiograph)
    assert set(found) == {"LEFT", "RIGHT"}
    assert found["RIGHT"][0][0] < found["LEFT"][0][0]  # patient RIGHT on the image's left
    noise = Radiograph(
        pixels=np.random.default_rng(3).random(radiograph.pixels.shape, dtype=np.float32) * 4000,
        spacing_mm=radiograph.spacing_mm,
        spacing_source="caller",
    )
    with pytest.raises(KneeNotFound):
        locate_knees(noise, localiser)


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path):
    from mris.training.trainer import RegionData, RegionTrainer, set_determinism

    rng = np.random.default_rng(0)
    knees = [
        f"S{i // 4}:{'LEFT' if i % 2 else 'RIGHT'}" for i in range(40)
    ]  # 20 knees, 2 visits each
    data = RegionData(
        radiographs=rng.random((40, 32, 32), dtype=np.float32),
        thickness=rng.random((40, 32, 32), dtype=np.float32),
        train_rows=list(range(32)),
        train_knees=knees[:32],
        val_rows=list(range(32, 40)),
    )
    profile = dataclasses.replace(TINY, epochs=2, batch_size=6, step_size=1)

    def make(folder: str) -> RegionTrainer:
        set_determinism(0, threads=1)
        return RegionTrainer(
            "separate-fc",
            data,
            profile,
            tmp_path / folder,
            torch.device("cpu"),
            seed=0,
            log=lambda m: None,
        )

    straight = make("a")
    straight.fit()
    interrupted = make("b")
    interrupted.fit(stop_after_epoch=1)
    resumed = make("b")  # a new process would build a fresh trainer, then load last.pt
    resumed.fit(resume=True)
    for key, value in straight.f.state_dict().items():
        assert torch.equal(value, resumed.f.state_dict()[key]), key
    for key, value in straight.g.state_dict().items():
        assert torch.equal(value, resumed.g.state_dict()[key]), key
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert resumed.scheduler.state_dict()["last_epoch"] == 2


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    from mris.training.trainer import RegionData, RegionTrainer

    rng = np.random.default_rng(0)
    data = RegionData(
        rng.random((8, 32, 32), dtype=np.float32),
        rng.random((8, 32, 32), dtype=np.float32),
        list(range(6)),
        [f"K{i}" for i in range(6)],
        [6, 7],
    )
    trainer = RegionTrainer(
        "x", data, TINY, tmp_path, torch.device("cpu"), seed=0, log=lambda m: None
    )
    with pytest.raises(FileNotFoundError):
        trainer.fit(resume=True)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume"):
        trainer.fit(resume=True)


def test_cache_rebuilds_when_a_constant_changes(tiny_cohort, tmp_path):
    from mris.training.cache import build_cache

    manifest = read_manifest(tiny_cohort)
    rows = manifest.select(["test"])[:4]
    first = build_cache(
        tiny_cohort, manifest, rows, PreprocessConfig(encoder_px=16), tmp_path, ["radiograph", "fc"]
    )
    again = build_cache(
        tiny_cohort, manifest, rows, PreprocessConfig(encoder_px=16), tmp_path, ["radiograph", "fc"]
    )
    assert again.root == first.root  # reused, not rebuilt
    changed = build_cache(
        tiny_cohort,
        manifest,
        rows,
        PreprocessConfig(encoder_px=16, roi_size_mm=120.0),
        tmp_path,
        ["radiograph"],
    )
    assert changed.root != first.root
    assert first["radiograph"].shape == (4, 16, 16)
    assert not np.array_equal(first["radiograph"], changed["radiograph"])


def test_clear_errors_for_bad_input(tmp_path, tiny_cohort):
    from mris.errors import BadParameter
    from mris.training.run import TrainRequest, train

    with pytest.raises(ManifestError, match="does not exist"):
        train(TrainRequest(manifest=tmp_path / "nope.csv", out=tmp_path / "m"))
    manifest = read_manifest(tiny_cohort)
    only_test = tmp_path / "test-only.csv"
    write_manifest(
        only_test,
        [
            dataclasses.replace(r, radiograph_path=str(manifest.resolve_path(r.radiograph_path)))
            for r in manifest.select(["test"])
        ],
    )
    with pytest.raises(ManifestError, match="no 'database' rows"):
        train(TrainRequest(manifest=only_test, out=tmp_path / "m"))
    with pytest.raises(BadParameter, match="--resume"):
        train(TrainRequest(manifest=tiny_cohort, out=tmp_path / "m2", resume=True, profile="tiny"))


def test_card_metrics_are_json(trained):
    out, summary = trained
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["regions"].keys() == summary["regions"].keys()
    assert "localiser" in card["metrics"]
    for region in card["metrics"]["regions"].values():
        # first-visit recall of the held-out validation subjects against chance, with subject
        # intervals
        held_out = region["validation_first_visit"]
        assert held_out["gallery"] == held_out["queries"] == card["training"]["validation_knees"]
        for k in ("R@1", "R@5", "R@10", "R@20"):
            assert held_out["chance"][k] == pytest.approx(
                min(1.0, int(k[2:]) / held_out["gallery"])
            )
            assert held_out["ratio_to_chance"][k] == pytest.approx(
                held_out["recall"][k] / held_out["chance"][k]
            )
            low, high = held_out["ci95"][k]
            assert low <= held_out["recall"][k] <= high
        test = region["test"]["first_visit"]
        assert test["ratio_to_chance"]["R@20"] == pytest.approx(
            test["recall"]["R@20"] / test["chance"]["R@20"]
        )
        assert "ci95" in test and "curve" not in test


def test_roi_command_finds_knees_with_the_trained_localiser(trained, tiny_cohort, tmp_path):

    from typer.testing import CliRunner

    from mris.cli import app
    from mris.manifest import read_manifest

    out = any_confidence_copy(trained[0], tmp_path / "bundle")
    manifest = read_manifest(tiny_cohort)
    row = manifest.rows[0]
    png = tmp_path / "roi.png"
    result = CliRunner().invoke(
        app,
        [
            "roi",
            str(manifest.resolve_path(row.radiograph_path)),
            "--model",
            str(out),
            "--out",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LEFT" in result.output and "RIGHT" in result.output


def test_train_resume_continues_a_run_and_refuses_another(tiny_cohort, tmp_path):
    from mris.errors import BadParameter
    from mris.training.run import TrainRequest, train

    out = tmp_path / "bundle"
    base = dict(
        manifest=tiny_cohort,
        out=out,
        variant="separate",
        profile="tiny",
        threads=2,
        localiser=False,
    )
    train(TrainRequest(**base))
    card_before = (out / "card.json").read_bytes()
    summary = train(TrainRequest(**base, resume=True))  # finished run: resumes at its last epoch
    assert "separate-fc" in summary["regions"] and (out / "card.json").is_file()
    assert card_before  # the first run wrote a card too
    with pytest.raises(BadParameter, match="different"):
        train(TrainRequest(**{**base, "variant": "both"}, resume=True))


def test_evaluation_rois_fall_back_to_keypoints_where_the_localiser_finds_no_knee(
    trained, tiny_cohort, tmp_path
):
    """``mris evaluate`` finds knees as the service does and counts the knees it had to take from
    the manifest's keypoints (here: a radiograph replaced by noise, which the localiser refuses)."""
    import pydicom

    from mris.evaluation.methods import collect_rois
    from mris.index.build import build_index_bundle
    from mris.pipeline import Pipeline

    out, _ = trained
    build_index_bundle(
        out, tiny_cohort, tmp_path / "index", variant="separate", publish=True, threads=1
    )
    pipeline = Pipeline.load(out, tmp_path / "index", "separate", intra_op_threads=1)
    manifest = read_manifest(tiny_cohort)
    rows = manifest.select(["test"])
    victim = rows[0].radiograph_path
    dataset = pydicom.dcmread(manifest.resolve_path(victim))
    pixels = dataset.pixel_array
    noise = (
        np.random.default_rng(4)
        .integers(0, int(pixels.max()) + 1, pixels.shape)
        .astype(pixels.dtype)
    )
    dataset.PixelData = noise.tobytes()
    noisy = str(tmp_path / "noise.dcm")
    dataset.save_as(noisy)
    for row in rows:
        if row.radiograph_path == victim:
            row.radiograph_path = noisy  # absolute: resolve_path leaves it as is
    roi_set = collect_rois(pipeline, manifest, rows, use_localiser=True)
    knees_on_victim = sum(row.radiograph_path == noisy for row in rows)
    # the tiny localiser (a few epochs) also misses some real knees; the demo's finds every one
    assert roi_set.keypoint_fallbacks >= knees_on_victim > 0
    assert len(roi_set.rows) == len(rows) and not roi_set.skipped  # nothing dropped
    sources = {row.radiograph_path == noisy: set() for row in rows}
    for roi, row in zip(roi_set.rois, roi_set.rows):
        sources[row.radiograph_path == noisy].add(roi.source)
    assert sources[True] == {"caller"}  # the noise image's knees came from the keypoints
