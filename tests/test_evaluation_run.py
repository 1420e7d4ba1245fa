"""``mris evaluate`` end to end on a tiny cohort: it trains what is missing (combined encoders,
U-Net, pix2pix) with the same commands a user types, builds the indexes, and writes every table, the
report and the figures; the mean-map row is checked against an independent computation, and a
radiograph that cannot be read is skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require
from typer.testing import CliRunner

require("torch")

from mris.cli import app  # noqa: E402
from mris.manifest import read_manifest, write_manifest  # noqa: E402
from mris.thickness import load_thickness_map  # noqa: E402


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from conftest import write_tiny_cohort

    from mris.training.run import TrainRequest, train

    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_tiny_cohort(root / "cohort", subjects=16)
    model = root / "model"
    # The separate variant only, one epoch of the quick profile, no localiser (ROIs from keypoints).
    train(
        TrainRequest(
            manifest=manifest,
            out=model,
            variant="separate",
            profile="quick",
            epochs=1,
            batch_size=8,
            threads=2,
            localiser=False,
        )
    )
    out = root / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--model",
            str(model),
            "--index",
            str(root / "no-index-yet"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--bootstrap",
            "50",
            "--threads",
            "2",
            "--examples",
            "3",
            "--quiet",
            "--classifier-epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    return manifest, model, out, result.output


def test_every_table_and_figure_is_written(evaluated):
    manifest, _, out, output = evaluated
    for name in (
        "report.md",
        "report.json",
        "knees.csv",
        "recall_at_k.png",
        "error_by_klg.png",
        "examples.png",
    ):
        assert (out / name).is_file(), name
    for name in ("recall_at_k.png", "error_by_klg.png", "examples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())  # strict JSON: NaN became null
    assert report["methods"] == ["mris-c", "mris-s", "unet", "pix2pix", "mean", "oracle"]
    assert set(report["table1_retrieval"]) == {"femoral", "tibial", "combined"}
    all_methods = {"mris-c", "mris-s", "unet", "pix2pix", "mean", "oracle"}
    assert set(report["table2_error"]["methods"]) == all_methods
    main = report["table2_reference"]
    assert set(main["methods"]) == all_methods and main["size"] == [256, 256]
    assert set(main["paired"]) == {"mris-s vs unet", "mris-s vs mris-c", "mris-s vs pix2pix"}
    for method in main["methods"].values():
        assert set(method["fc"]) == {"KLG01", "KLG2", "KLG3", "KLG4", "all"}
        assert method["fc"]["all"]["n"] == main["pairs"] == report["table2_error"]["knees"]
    assert set(report["table3_downstream"]["methods"]) == {"mr"} | all_methods
    assert set(report["table3_downstream"]["classifiers"]) == {"resnet18", "logistic"}
    assert report["table3_downstream"]["settings"]["resnet18"]["klg"]["epochs"] == 1
    # what was missing was made under OUT/work by the user's commands
    for folder in (
        "model-combined/card.json",
        "unet/unet-card.json",
        "pix2pix/pix2pix-card.json",
        "index-separate/current",
        "index-combined/current",
    ):
        assert (out / "work" / folder).exists(), folder
    text = (out / "report.md").read_text()
    for heading in (
        "Table 1",
        "Table 2",
        "Table 2b",
        "Table 3",
        "What agrees with the paper",
        "## Cohort",
        "mris evaluate",
        "ratio to chance",
        "Paired comparisons",
        "| pix2pix |",
        "- pix2pix: U-Net width 16 at 64 px (quick profile",
    ):
        assert heading in text
    assert "Table 1: retrieval" in output and "report:" in output


def test_retrieval_rows_are_consistent(evaluated):
    _, _, out, _ = evaluated
    report = json.loads((out / "report.json").read_text())
    test_knees = {row.knee_id for row in read_manifest(evaluated[0]).select(["test"])}
    for row in report["table1_retrieval"].values():
        recalls = [row["recall"][k] for k in ("R@1", "R@5", "R@10", "R@20")]
        assert recalls == sorted(recalls) and 0.0 <= recalls[0] and recalls[-1] <= 1.0
        assert row["gallery"] == row["queries"] == len(test_knees)  # one query per test knee
        assert row["chance"]["R@1"] == pytest.approx(1 / row["gallery"])
        low, high = row["ci95"]["R@1"]
        assert low <= row["recall"]["R@1"] <= high


def test_mean_map_row_equals_an_independent_computation(evaluated):
    manifest_path, _, out, _ = evaluated
    manifest = read_manifest(manifest_path)
    report = json.loads((out / "report.json").read_text())
    per_knee = report["per_knee"]
    rows = {row.pair_id: row for row in manifest.select(["test"])}
    for name, column in (("fc", "fc_path"), ("tc", "tc_path")):
        database = np.stack(
            [
                load_thickness_map(manifest.resolve_path(getattr(r, column)))
                for r in manifest.select(["database"])
            ]
        ).astype(np.float64)
        present = np.isfinite(database)
        total = np.where(present, database, 0.0).sum(axis=0)
        mean = np.where(
            present.mean(axis=0) >= 0.5, total / np.maximum(present.sum(axis=0), 1), np.nan
        )
        for pair, reported in zip(per_knee["pair_ids"], per_knee["mae"]["mean"][name]):
            truth = load_thickness_map(manifest.resolve_path(getattr(rows[pair], column)))
            both = np.isfinite(truth) & np.isfinite(mean)
            assert reported == pytest.approx(
                float(np.mean(np.abs(mean[both] - truth[both]))), rel=1e-4
            )
        # Table 2's median of the mean-map row is the median of those per-knee errors
        table = report["table2_error"]["methods"]["mean"][name]["all"]
        assert table["median"] == pytest.approx(float(np.median(per_knee["mae"]["mean"][name])))


def test_oracle_and_downstream_sanity(evaluated):
    _, _, out, _ = evaluated
    report = json.loads((out / "report.json").read_text())
    for name in ("fc", "tc"):
        for method in ("unet", "pix2pix"):
            coverage = report["table2_error"]["methods"][method][name]["coverage_mean"]
            assert 0.0 < coverage <= 1.0
    t3 = report["table3_downstream"]
    mean_entry = t3["methods"]["mean"]
    # the mean map gives every knee the same features: the classifier can only learn the prior
    if "progression" in mean_entry:
        assert mean_entry["progression"]["roc_auc"] in (0.5, None)
    for entry in t3["methods"].values():
        if "klg" in entry:
            assert 0.0 <= entry["klg"]["accuracy"] <= 1.0
            assert sum(map(sum, entry["klg"]["confusion"])) == t3["counts"]["klg"]["test"]


def test_an_unreadable_radiograph_and_a_missing_map_are_skipped_and_counted(evaluated, tmp_path):
    manifest_path, model, first, _ = evaluated
    manifest = read_manifest(manifest_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom at all")
    test_rows = manifest.select(["test"])
    victim = test_rows[0].radiograph_path
    no_map = next(row.pair_id for row in test_rows if row.radiograph_path != victim)
    rows = []
    for row in manifest.rows:
        row.radiograph_path = (
            str(manifest.resolve_path(row.radiograph_path))
            if row.radiograph_path != victim
            else str(broken)
        )
        row.fc_path, row.tc_path = (
            str(manifest.resolve_path(row.fc_path)),
            str(manifest.resolve_path(row.tc_path)),
        )
        if row.pair_id == no_map:
            row.fc_path = str(tmp_path / "gone_fc.npy")
        rows.append(row)
    copy = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--manifest",
            str(copy),
            "--model",
            str(model),
            "--index",
            str(first / "work" / "index-separate"),
            "--out",
            str(out),
            "--methods",
            "mris-s,mean",
            "--bootstrap",
            "10",
            "--quiet",
            "--classifiers",
            "logistic",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    victims = sum(1 for row in rows if row.radiograph_path == str(broken))
    assert report["rois"]["test"]["skipped"] == {"UnreadableDicom": victims, "missing map": 1}
    assert no_map not in report["per_knee"]["pair_ids"]
    assert "trained on another manifest" in " ".join(
        report["warnings"]
    )  # the copy differs byte-wise
    assert not (out / "work" / "index-separate").exists()  # --index held the right variant: reused


def test_bad_options_are_one_clear_error(evaluated, tmp_path):
    manifest, model, first, _ = evaluated
    runner = CliRunner()
    base = [
        "evaluate",
        "--manifest",
        str(manifest),
        "--model",
        str(model),
        "--index",
        str(first),
        "--out",
        str(tmp_path / "r"),
    ]
    result = runner.invoke(app, [*base, "--methods", "mris-s,magic"])
    assert result.exit_code != 0 and "magic" in str(result.exception)
    result = runner.invoke(app, [*base, "--methods", "unet", "--profile", "paper"])
    assert result.exit_code != 0 and "256 px" in str(result.exception)


def test_evaluation_with_trained_artefacts_imports_no_torch(evaluated, tmp_path):
    import subprocess
    import sys

    manifest, model, first, _ = evaluated
    work = first / "work"
    script = (
        f"""
import sys
from typer.testing import CliRunner
from mris.cli import app
r = CliRunner().invoke(app, ["evaluate", "--manifest", r"{manifest}", "--model", r"{model}",
    "--index", r"{work / "index-separate"}", "--combined-model", r"{work / "model-combined"}",
    "--unet", r"{work / "unet"}", "--pix2pix", r"{work / "pix2pix"}","""
        f""" "--out", r"{tmp_path / "report"}", "--bootstrap", "10", "--quiet",
    "--classifiers", "logistic"])  # Table 3's ResNet-18 is the one part that needs torch
assert r.exit_code == 0, (r.output, r.exception)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
print("OK")
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr + out.stdout
    assert (tmp_path / "report" / "report.json").is_file()
