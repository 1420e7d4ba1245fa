"""Index bundles end to end on a tiny real model and tiny real maps: build, verify, publish,
search (vs brute force), synthesize, append, gc, crashes, tampering and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
from bundle_factory import make_map_cohort, make_model_bundle

from mris.errors import BadParameter, BundleInvalid, BundleMismatch, ManifestError, MrisError
from mris.index import publish as pub
from mris.index.build import build_index_bundle
from mris.index.bundle import load_index_bundle, read_card
from mris.index.verify import verify_bundle
from mris.manifest import read_manifest, write_manifest
from mris.model_bundle import load_model_bundle
from mris.synthesis import synthesize
from mris.thickness import combined_input, map_to_input

N_PAIRS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_bundle(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_map_cohort(tmp_path_factory.mktemp("cohort"), N_PAIRS)


def build(model_dir, manifest, root, **options):
    options.setdefault("threads", 1)
    return build_index_bundle(model_dir, manifest, root, **options)


def ort_embed(path, images):
    """Independent of mris.encoders: a bare onnxruntime session."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"image": np.asarray(images, np.float32)})[0]


def brute_force(database, queries, k):
    similarities = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, order, axis=1), order


def synthesize_from(bundle, region, queries, k):
    """Search + eq. 4 per cartilage, as ``mris.pipeline`` does with a bundle."""
    similarities, ids = bundle.search(region, queries, k)
    return {
        c: synthesize(bundle.neighbour_maps(c, ids), similarities)
        for c in bundle.cartilages(region)
    }


def snapshot(root):
    return pub.current_version(root), [v.version for v in pub.list_versions(root)]


def test_build_verify_publish_search_synthesize(model_dir, cohort, tmp_path):
    root = tmp_path / "index"
    result = build(model_dir, cohort, root, publish=True)
    assert result.rows == N_PAIRS and result.new_rows == N_PAIRS and result.published
    assert pub.current_version(root) == result.version and pub.is_version_name(result.version)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    model = load_model_bundle(model_dir)
    report = verify_bundle(root / result.version, model_card=model.card)
    assert report.self_retrieval == {"fc": 1.0, "tc": 1.0}
    card = read_card(root / "current")
    assert (
        card.regions["fc"].thickness_encoder_sha256
        == model.card.files["separate-fc-thickness.onnx"]
    )
    assert card.regions["fc"].kind == "flat" and card.maps["fc"].shape == (N_PAIRS, 40, 36)

    bundle = load_index_bundle(root, model_card=model.card)
    manifest = read_manifest(cohort)
    rows = manifest.select(["database"])
    config = model.card.preprocess_config
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 1, (6, 1, 32, 32)).astype(np.float32)
    for region in ("fc", "tc"):
        maps = [np.load(manifest.resolve_path(getattr(r, f"{region}_path"))) for r in rows]
        inputs = np.stack([map_to_input(m, config) for m in maps])[:, None]
        database = ort_embed(model_dir / f"separate-{region}-thickness.onnx", inputs)
        queries = ort_embed(model_dir / f"separate-{region}-radiograph.onnx", images)
        want_sims, want_ids = brute_force(database, queries, 20)
        sims, ids = bundle.search(region, queries, 20)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
        # synthesis from the bundle == eq. 4 over the original .npy files
        out = synthesize_from(bundle, region, queries, 20)[region]
        neighbour_maps = np.stack([np.stack([maps[i] for i in row]) for row in want_ids])
        expected = synthesize(neighbour_maps, want_sims)
        np.testing.assert_allclose(
            out.thickness_mm, expected.thickness_mm, atol=1e-5, equal_nan=True
        )
        np.testing.assert_allclose(out.std_mm, expected.std_mm, atol=1e-5, equal_nan=True)
    assert bundle.row_metadata([0])[0]["pair_id"] == rows[0].pair_id
    assert bundle.search("fc", queries, 500)[1].shape == (6, N_PAIRS)  # k capped at rows
    with pytest.raises(BadParameter):
        bundle.search("combined", queries, 5)
    resident = load_index_bundle(root, resident_maps=True)
    ids = bundle.search("tc", queries, 20)[1]
    np.testing.assert_array_equal(
        resident.neighbour_maps("tc", ids), bundle.neighbour_maps("tc", ids)
    )


def test_combined_variant_synthesizes_both_maps(model_dir, cohort, tmp_path):
    result = build(model_dir, cohort, tmp_path / "index", variant="combined", publish=True)
    bundle = load_index_bundle(tmp_path / "index")
    assert bundle.regions == ["combined"] and bundle.cartilages("combined") == ["fc", "tc"]
    manifest = read_manifest(cohort)
    rows = manifest.select(["database"])
    config = load_model_bundle(model_dir).card.preprocess_config
    inputs = np.stack(
        [
            combined_input(
                np.load(manifest.resolve_path(r.fc_path)),
                np.load(manifest.resolve_path(r.tc_path)),
                config,
            )
            for r in rows
        ]
    )[:, None]
    database = ort_embed(model_dir / "combined-thickness.onnx", inputs)
    np.testing.assert_allclose(bundle.embeddings("combined"), database, atol=1e-6)
    out = synthesize_from(bundle, "combined", database[:3], 20)
    assert set(out) == {"fc", "tc"} and out["fc"].thickness_mm.shape == (3, 40, 36)
    assert result.card.regions["combined"].maps == ["fc", "tc"]


def test_append_reuses_stored_embeddings_and_refuses_other_encoders(model_dir, tmp_path):
    data = tmp_path / "data"
    make_map_cohort(data, 30, manifest_name="base.csv")
    base = build(model_dir, data / "base.csv", tmp_path / "index", publish=True)
    full = make_map_cohort(data, 10, first_index=30, manifest_name="new.csv")
    rows = read_manifest(data / "base.csv").rows + read_manifest(full).rows
    write_manifest(data / "all.csv", rows)
    # Timing-free proof that old rows are not re-embedded: their map files are gone.
    for row in rows[:30]:
        (data / row.fc_path).unlink()
        (data / row.tc_path).unlink()
    seen = []
    appended = build(
        model_dir,
        data / "all.csv",
        tmp_path / "index",
        append_from="current",
        publish=True,
        on_start=seen.append,
    )
    assert (
        seen == [10]
        and appended.new_rows == 10
        and appended.reused_rows == 30
        and appended.rows == 40
    )
    new = load_index_bundle(tmp_path / "index")
    old = load_index_bundle(tmp_path / "index" / base.version)
    assert new.card.source["appended_from"] == base.version
    for region in ("fc", "tc"):
        np.testing.assert_array_equal(new.embeddings(region)[:30], old.embeddings(region))
        np.testing.assert_array_equal(new.maps[region].array[:30], old.maps[region].array)
    assert [r.pair_id for r in new.rows] == [r.pair_id for r in rows]
    verify_bundle(appended.path)
    # nothing new -> clear refusal
    with pytest.raises(ManifestError, match="nothing to append"):
        build(model_dir, data / "all.csv", tmp_path / "index", append_from="current")
    # other encoders -> refused, current untouched
    other = make_model_bundle(tmp_path / "other-model", seed=1)
    before = snapshot(tmp_path / "index")
    with pytest.raises(BundleMismatch, match="cannot append"):
        build(other, data / "new.csv", tmp_path / "index", append_from="current")
    assert snapshot(tmp_path / "index") == before
    with pytest.raises(BundleMismatch):
        load_index_bundle(tmp_path / "index", model_card=load_model_bundle(other).card)
    # gc keeps current
    removed = pub.gc(tmp_path / "index", keep=1)
    assert removed == [base.version] and pub.current_version(tmp_path / "index") == appended.version


def test_unreadable_map_mid_build_leaves_current_and_no_half_bundle(model_dir, tmp_path):
    data = tmp_path / "data"
    manifest = make_map_cohort(data, 30)
    first = build(model_dir, manifest, tmp_path / "index", publish=True)
    rows = read_manifest(manifest).rows
    (data / rows[20].tc_path).write_bytes(b"\x93NUMPY garbage")  # a real failure mid-stream
    before = snapshot(tmp_path / "index")
    with pytest.raises(MrisError, match=rows[20].pair_id):
        build(model_dir, manifest, tmp_path / "index", publish=True, batch_size=4)
    assert snapshot(tmp_path / "index") == before == (first.version, [first.version])
    assert not [p for p in (tmp_path / "index").iterdir() if p.name.startswith(".")]
    # with --skip-missing it is skipped and counted
    result = build(model_dir, manifest, tmp_path / "index", skip_missing=True, batch_size=4)
    assert result.rows == 29 and result.skipped == {"unreadable": [rows[20].pair_id]}
    assert pub.current_version(tmp_path / "index") == first.version  # not published
    verify_bundle(result.path)


def test_sigkill_mid_build_leaves_current_serving_old_bundle(model_dir, tmp_path):
    data = tmp_path / "data"
    manifest = make_map_cohort(data, 24)
    root = tmp_path / "index"
    first = build(model_dir, manifest, root, publish=True)
    rows = read_manifest(manifest).rows
    real = data / rows[16].fc_path
    shutil.move(real, data / "held.npy")
    os.mkfifo(real)  # reading it blocks: the build is stuck half-way until we kill it
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mris.cli",
            "index",
            "build",
            "--model",
            str(model_dir),
            "--manifest",
            str(manifest),
            "--root",
            str(root),
            "--publish",
            "--quiet",
            "--batch-size",
            "4",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        building = []
        while time.time() < deadline:
            building = [p for p in root.iterdir() if p.name.startswith(".building-")]
            if building and (building[0] / "maps-fc.npy").exists():
                break
            time.sleep(0.05)
        assert building, "the build never started"
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert snapshot(root) == (first.version, [first.version])
    served = load_index_bundle(root)
    assert served.card.version == first.version and served.card.rows == 24
    verify_bundle(root / first.version)
    # running again starts clean: the dead build's folder is removed
    real.unlink()
    shutil.move(data / "held.npy", real)
    again = build(model_dir, manifest, root, publish=True)
    assert pub.current_version(root) == again.version
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_tampered_file_fails_verify(model_dir, cohort, tmp_path):
    result = build(model_dir, cohort, tmp_path / "index")
    maps = result.path / "maps-fc.npy"
    data = bytearray(maps.read_bytes())
    data[-5] ^= 0xFF
    os.chmod(maps, 0o644)
    maps.write_bytes(bytes(data))
    with pytest.raises(BundleInvalid, match="maps-fc.npy sha256 differs"):
        verify_bundle(result.path)
    cli = subprocess.run(
        [sys.executable, "-m", "mris.cli", "index", "verify", str(result.path)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode != 0 and "sha256 differs" in cli.stderr
    maps.write_bytes(bytes(data[:-100]))
    with pytest.raises(BundleInvalid, match="card says"):
        load_index_bundle(result.path)


def test_unlisted_file_fails_verify(model_dir, cohort, tmp_path):
    result = build(model_dir, cohort, tmp_path / "index")
    (result.path / "extra.npy").write_bytes(b"x")
    with pytest.raises(BundleInvalid, match="unlisted"):
        verify_bundle(result.path)


def test_bad_input_is_a_clear_error_and_never_touches_current(model_dir, tmp_path):
    data = tmp_path / "data"
    manifest = make_map_cohort(data, 12)
    root = tmp_path / "index"
    first = build(model_dir, manifest, root, publish=True)
    before = snapshot(root)
    rows = read_manifest(manifest).rows

    with pytest.raises(ManifestError, match="does not exist"):
        build(model_dir, data / "nope.csv", root, publish=True)
    with pytest.raises(ManifestError, match="no rows for split"):
        build(model_dir, manifest, root, splits=["test"], publish=True)
    np.save(data / rows[5].fc_path, np.full((40, 36), np.nan, np.float32))
    with pytest.raises(MrisError, match="P00005.*NaN everywhere"):
        build(model_dir, manifest, root, publish=True)
    (data / rows[3].fc_path).unlink()
    (data / rows[7].tc_path).unlink()
    with pytest.raises(ManifestError, match=r"2 map file\(s\) missing: P00003.*P00007"):
        build(model_dir, manifest, root, publish=True)
    assert snapshot(root) == before
    skipped = build(model_dir, manifest, root, skip_missing=True)
    assert skipped.rows == 9
    assert skipped.skipped == {"missing": ["P00003", "P00007"], "all_nan": ["P00005"]}
    assert read_card(skipped.path).source["skipped"] == {"missing": 2, "all_nan": 1}
    before = snapshot(root)

    broken = tmp_path / "model-broken"
    shutil.copytree(model_dir, broken)
    (broken / "separate-tc-thickness.onnx").unlink()
    with pytest.raises(BundleInvalid, match="incomplete"):
        build(broken, manifest, root, publish=True, skip_missing=True)
    shutil.copy(model_dir / "separate-tc-thickness.onnx", broken / "separate-tc-thickness.onnx")
    with open(broken / "separate-fc-thickness.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleInvalid, match="does not match its sha256"):
        build(broken, manifest, root, publish=True, skip_missing=True)
    with pytest.raises(BadParameter):
        build(model_dir, manifest, root, maps_dtype="int8")
    assert snapshot(root) == before and pub.current_version(root) == first.version
    assert not [p for p in root.iterdir() if p.name.startswith(".")]

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mris.cli",
            "index",
            "build",
            "--model",
            str(model_dir),
            "--manifest",
            str(manifest),
            "--root",
            str(root),
            "--publish",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "missing" in cli.stderr and "--skip-missing" in cli.stderr
    assert snapshot(root) == before


def test_float16_maps(model_dir, cohort, tmp_path):
    full = load_index_bundle(build(model_dir, cohort, tmp_path / "a").path)
    half = load_index_bundle(build(model_dir, cohort, tmp_path / "b", maps_dtype="float16").path)
    assert half.card.maps["fc"].dtype == "float16"
    assert (tmp_path / "b").stat() and half.maps["fc"].array.nbytes * 2 == full.maps[
        "fc"
    ].array.nbytes
    queries = full.embeddings("fc")[:8] * 0.9 + full.embeddings("fc")[8:16] * 0.1
    a = synthesize_from(full, "fc", queries, 20)["fc"].thickness_mm
    b = synthesize_from(half, "fc", queries, 20)["fc"].thickness_mm
    assert np.nanmax(np.abs(a - b)) < 1e-3


def test_cli_build_list_gc_and_no_torch(model_dir, cohort, tmp_path):
    root = tmp_path / "index"
    script = f"""
import sys
from typer.testing import CliRunner
from mris.cli import app
runner = CliRunner()
for args in (["--publish"], []):
    r = runner.invoke(app, ["index", "build", "--model", r"{model_dir}", "--manifest", r"{cohort}",
                            "--root", r"{root}", "--quiet", "--threads", "1", *args])
    assert r.exit_code == 0, (r.output, r.exception)
from mris.index import load_index_bundle
from mris.synthesis import synthesize
b = load_index_bundle(r"{root}")
similarities, ids = b.search("fc", b.embeddings("fc")[:2], 20)
synthesize(b.neighbour_maps("fc", ids), similarities)
r = runner.invoke(app, ["index", "list", r"{root}"])
assert r.exit_code == 0 and r.output.count("rows") == 2 and r.output.count("*") == 1, r.output
r = runner.invoke(app, ["index", "verify", r"{root}"])
assert r.exit_code == 0 and "self-retrieval" in r.output, r.output
r = runner.invoke(app, ["index", "gc", r"{root}", "--keep", "1"])
assert r.exit_code == 0 and "removed 0 version" in r.output, r.output
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr + out.stdout
    assert len(pub.list_versions(root)) == 2  # the newest and current (the older, published one)


def _set_preprocessing_version(card_path, version):
    """Rewrite a card as an older mris wrote it: no ``preprocessing_version`` (None) or another."""
    import json

    card = json.loads(card_path.read_text())
    if version is None:
        card.pop("preprocessing_version", None)
    else:
        card["preprocessing_version"] = version
    card_path.write_text(json.dumps(card))


@pytest.mark.parametrize("old_version", [None, 1])
def test_bundles_of_an_older_roi_normalisation_are_refused(
    model_dir, cohort, tmp_path, old_version
):
    from mris.constants import PREPROCESSING_VERSION

    root = tmp_path / "index"
    result = build(model_dir, cohort, root, publish=True)
    assert read_card(result.path).preprocessing_version == PREPROCESSING_VERSION
    assert load_model_bundle(model_dir).card.preprocessing_version == PREPROCESSING_VERSION

    old_model = tmp_path / "old-model"
    shutil.copytree(model_dir, old_model)
    _set_preprocessing_version(old_model / "card.json", old_version)
    with pytest.raises(BundleMismatch, match=r"older ROI normalisation.*retrained \(`mris train"):
        load_model_bundle(old_model)
    with pytest.raises(BundleMismatch, match="older ROI normalisation"):
        build(old_model, cohort, tmp_path / "index-from-old-model")
    assert not (tmp_path / "index-from-old-model").exists() or not pub.list_versions(
        tmp_path / "index-from-old-model"
    )

    _set_preprocessing_version(result.path / "card.json", old_version)
    model = load_model_bundle(model_dir)
    rebuild = r"older ROI normalisation.*rebuilt .*`mris index build"
    with pytest.raises(BundleMismatch, match=rebuild):
        read_card(result.path)
    with pytest.raises(BundleMismatch, match=rebuild):
        load_index_bundle(root, model_card=model.card)
    with pytest.raises(BundleMismatch, match=rebuild):
        load_index_bundle(root)
    with pytest.raises(BundleMismatch, match=rebuild):
        verify_bundle(result.path, model_card=model.card)
    with pytest.raises(BundleMismatch, match=rebuild):
        build(model_dir, cohort, root, append_from="current")
    # Listing still shows it, marked.
    assert read_card(result.path, check_preprocessing=False).preprocessing_version == old_version
