"""``mris synthesize-batch`` end to end (local engine and a real local Ray cluster), resume
after a kill, failures as rows, and ``mris index build --engine ray`` equal to the local build."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require, require_binary
from serve_process import free_port

from mris.batch.plan import (
    MAP_LAYERS,
    BatchInputs,
    inputs_from_folder,
    inputs_from_manifest,
    remove_partial_files,
    shard_paths,
)
from mris.batch.shard import FAILURE_REASONS, failure_reason
from mris.errors import DecoderCrashed, KneeNotFound, UnreadableDicom

MRIS = [sys.executable, "-m", "mris.cli"]
RADIOGRAPHS = 6  # of the tiny cohort, copied into a folder with two bad files


@pytest.fixture(scope="module")
def inputs_dir(tiny_cohort, tmp_path_factory) -> Path:
    """Six tiny-cohort radiographs in a folder tree, a file that is not DICOM and a truncated
    DICOM."""
    folder = tmp_path_factory.mktemp("batch-inputs")
    sources = sorted((tiny_cohort.parent / "radiographs").rglob("*.dcm"))[:RADIOGRAPHS]
    for path in sources:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
    (folder / "notes.txt").write_text("not a radiograph\n")
    (folder / "truncated.dcm").write_bytes(sources[0].read_bytes()[:300])
    return folder


def _batch(bundles, inputs_dir: Path, out: Path, *extra: str, **run) -> subprocess.Popen:
    command = [
        *MRIS,
        "synthesize-batch",
        "--dicom-dir",
        str(inputs_dir),
        "--out",
        str(out),
        "--model",
        str(bundles["model"]),
        "--index",
        str(bundles["index"]),
        "--k",
        "3",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **run
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _rows(out: Path):
    import pyarrow.parquet as pq

    return pq.read_table(out / "rows").to_pandas().sort_values("knee_id").reset_index(drop=True)


def _failures(out: Path):
    import pyarrow.parquet as pq

    return pq.read_table(out / "failures").to_pandas().sort_values("source")


@pytest.fixture(scope="module")
def local_run(localised_bundles, inputs_dir, tmp_path_factory) -> Path:
    require("pyarrow")
    out = tmp_path_factory.mktemp("batch-local") / "out"
    _finish(_batch(localised_bundles, inputs_dir, out, "--shard-size", "3"))
    return out


def test_every_knee_is_a_row_and_bad_files_are_failures(local_run, localised_bundles):
    rows = _rows(local_run)
    assert len(rows) == 2 * RADIOGRAPHS
    assert rows["knee_id"].is_unique
    assert set(rows["side"]) == {"LEFT", "RIGHT"}
    assert (rows["centre_source"] == "localiser").all()
    for region in ("fc", "tc"):
        assert rows[f"{region}_neighbours"].map(len).eq(3).all()
        weights = np.stack(rows[f"{region}_weights"].to_numpy())
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    for name in ("fc", "tc"):
        assert (rows[f"{name}_mean_mm"] > 0).all()
        assert rows[f"{name}_sd_mean_mm"].notna().all()
    assert rows["reliability_mm"].isna().all()  # the session's index is not calibrated
    failures = _failures(local_run)
    assert failures["source"].tolist() == ["notes.txt", "truncated.dcm"]
    assert set(failures["reason"]) <= set(FAILURE_REASONS)
    assert (failures["reason"] == "unreadable").all(), failures.to_dict("records")
    summary = __import__("json").loads((local_run / "summary.json").read_text())
    assert summary["knees"] == 2 * RADIOGRAPHS and summary["failures"] == 2
    assert summary["complete"] is True


def test_a_rows_numbers_are_its_maps_numbers(local_run):
    """A knee's row points at its maps; the row's means are those maps' means."""
    rows = _rows(local_run)
    row = rows.iloc[0]
    maps = np.load(local_run / "maps" / f"{row['maps_shard']}.npy")
    assert maps.shape[1] == len(MAP_LAYERS) and maps.dtype == np.float16
    knee = maps[int(row["maps_index"])].astype(np.float64)
    assert np.nanmean(knee[0]) == pytest.approx(row["fc_mean_mm"], abs=2e-3)
    assert np.nanmean(knee[3]) == pytest.approx(row["tc_sd_mean_mm"], abs=2e-3)
    half = knee.shape[-1] // 2
    assert np.nanmean(knee[1][:, :half]) == pytest.approx(row["tc_medial_mm"], abs=2e-3)


def test_the_batch_rows_equal_the_service_pipelines(local_run, localised_bundles, inputs_dir):
    """Same code as the service: one file through ``Pipeline.run`` gives the row's neighbours."""
    from mris.options import RequestOptions
    from mris.pipeline import Pipeline

    rows = _rows(local_run)
    row = rows.iloc[0]
    pipeline = Pipeline.load(localised_bundles["model"], localised_bundles["index"])
    results = pipeline.run(inputs_dir / row["source"], RequestOptions(k=3))
    result = next(r for r in results if r.side == row["side"])
    assert [n.pair_id for n in result.neighbours["fc"]] == list(row["fc_neighbours"])
    assert float(np.nanmean(result.maps_mm["fc"])) == pytest.approx(row["fc_mean_mm"], abs=1e-5)


def test_a_rerun_of_a_complete_job_does_nothing(local_run, localised_bundles, inputs_dir):
    before = _rows(local_run)
    output = _finish(_batch(localised_bundles, inputs_dir, local_run, "--shard-size", "3"))
    assert "shards run / already complete" in output and "0 / 3" in output
    assert _rows(local_run).equals(before)


def test_a_rerun_with_other_options_is_refused(local_run, localised_bundles, inputs_dir):
    process = _batch(localised_bundles, inputs_dir, local_run, "--shard-size", "2")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "holds another job" in output and "shard_size" in output


def test_killed_halfway_then_rerun_every_knee_exactly_once(
    localised_bundles, inputs_dir, local_run, tmp_path
):
    """SIGKILL (no clean-up at all) once some shards are complete; the rerun finishes the job
    and its rows equal an uninterrupted run's."""
    out = tmp_path / "out"
    process = _batch(
        localised_bundles, inputs_dir, out, "--shard-size", "1", start_new_session=True
    )
    deadline = time.monotonic() + 240
    rows_dir = out / "rows"
    while time.monotonic() < deadline and process.poll() is None:
        if rows_dir.is_dir() and len(list(rows_dir.glob("shard-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    done = len(list(rows_dir.glob("shard-*.parquet")))
    assert 2 <= done < RADIOGRAPHS + 2
    _finish(_batch(localised_bundles, inputs_dir, out, "--shard-size", "1"))
    rows, reference = _rows(out), _rows(local_run)
    assert rows["knee_id"].is_unique and len(rows) == 2 * RADIOGRAPHS
    assert rows["knee_id"].tolist() == reference["knee_id"].tolist()
    for column in ("fc_mean_mm", "tc_sd_lateral_mm"):
        np.testing.assert_allclose(rows[column], reference[column], rtol=1e-6)
    assert len(_failures(out)) == 2
    assert not list(out.rglob(".tmp-*"))


def test_partial_files_of_an_unfinished_shard_are_removed(tmp_path):
    inputs = BatchInputs(tmp_path, ("/a", "/b"), ("a", "b"))
    first, second = inputs.shards(1)
    for shard in (first, second):
        for kind in ("maps", "failures"):
            path = shard_paths(tmp_path, shard)[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    shard_paths(tmp_path, first)["rows"].parent.mkdir(parents=True, exist_ok=True)
    shard_paths(tmp_path, first)["rows"].write_bytes(b"x")  # first complete
    (tmp_path / "maps" / ".tmp-shard-00001.npy.abc").write_bytes(b"x")
    assert remove_partial_files(tmp_path) == 3
    assert shard_paths(tmp_path, first)["maps"].exists()
    assert not shard_paths(tmp_path, second)["maps"].exists()


def test_inputs_are_sorted_and_sharded_the_same_every_time(tiny_cohort, inputs_dir):
    from_folder = inputs_from_folder(inputs_dir)
    assert list(from_folder.sources) == sorted(from_folder.sources)
    assert from_folder.digest == inputs_from_folder(inputs_dir).digest
    assert [len(s.files) for s in from_folder.shards(3)] == [3, 3, 2]
    from_manifest = inputs_from_manifest(tiny_cohort, ["test"])
    assert len(set(from_manifest.files)) == len(from_manifest.files)  # each radiograph once
    assert all(source.startswith("radiographs/") for source in from_manifest.sources)


def test_failure_reasons():
    assert failure_reason(DecoderCrashed("x")) == "decoder-crashed"
    assert failure_reason(UnreadableDicom("x")) == "unreadable"
    assert failure_reason(KneeNotFound("x")) == "knees-not-found"
    assert failure_reason(FileNotFoundError("x")) == "unreadable-file"
    assert failure_reason(ZeroDivisionError("x")) == "error"


# ------------------------------------------------------------------ Ray: a local 2-CPU cluster


RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Token authentication, as Ray sets up a cluster by default, with this session's own token
    # (not one a previous local cluster left in ~/.ray/auth_token).
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs, started as a user starts one (``ray start``), with
    token authentication; its address (jobs need ``RAY_ENV``). Stopped at the end."""
    require("ray")
    ray_bin = require_binary_in_venv("ray")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **RAY_ENV}
    start = [
        ray_bin,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--object-store-memory=200000000",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def require_binary_in_venv(name: str) -> str:
    """A console script of this environment (``ray``), else one on the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else require_binary(name, f"pip install {name}")


def _actor_pids() -> list[int]:
    """The Ray worker processes running a ``ShardActor`` (Ray names them after the actor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ShardActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_ray_engine_writes_the_same_rows_despite_a_killed_worker(
    ray_cluster, localised_bundles, inputs_dir, local_run
):
    """The Ray engine on a 2-CPU cluster: an actor SIGKILLed once some shards are complete is
    restarted by Ray and its shard redone; the rows equal the local engine's, each knee once."""
    out = local_run.parent / "ray-out"
    process = _batch(
        localised_bundles,
        inputs_dir,
        out,
        "--shard-size",
        "1",
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--actors",
        "2",
        env={**os.environ, **RAY_ENV},
    )
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline and process.poll() is None and killed is None:
        if len(list((out / "rows").glob("shard-*.parquet"))) >= 1 and _actor_pids():
            killed = _actor_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    output = _finish(process)
    assert killed is not None, "the job ended before a worker could be killed"
    rows, reference = _rows(out), _rows(local_run)
    assert rows["knee_id"].tolist() == reference["knee_id"].tolist(), output
    for region in ("fc", "tc"):
        assert rows[f"{region}_neighbours"].map(list).tolist() == (
            reference[f"{region}_neighbours"].map(list).tolist()
        )
    for column in ("fc_mean_mm", "tc_mean_mm", "fc_sd_medial_mm", "centre_x", "confidence"):
        np.testing.assert_allclose(rows[column], reference[column], rtol=1e-5, atol=1e-6)
    assert _failures(out)["reason"].tolist() == _failures(local_run)["reason"].tolist()
    assert not list(out.rglob(".tmp-*"))


def test_index_build_on_ray_equals_the_local_build(ray_cluster, localised_bundles, tiny_cohort):
    """``mris index build --engine ray`` on the cluster: the bundle equals the local build's (the
    same rows and maps, embeddings within 1e-6)."""
    from mris.index.bundle import load_index_bundle

    root = localised_bundles["index"].parent / "ray-index"
    command = [
        *MRIS,
        "index",
        "build",
        "--model",
        str(localised_bundles["model"]),
        "--manifest",
        str(tiny_cohort),
        "--root",
        str(root),
        "--threads",
        "1",
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--actors",
        "2",
        "--quiet",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, **RAY_ENV}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    version = done.stdout.strip().splitlines()[-1]
    local = load_index_bundle(localised_bundles["index"])
    remote = load_index_bundle(root / version)
    assert [r.pair_id for r in remote.rows] == [r.pair_id for r in local.rows]
    for region in ("fc", "tc"):
        np.testing.assert_allclose(
            np.load(remote.root / f"embeddings-{region}.npy"),
            np.load(local.root / f"embeddings-{region}.npy"),
            atol=1e-6,
        )
    rows = np.arange(len(local.rows))[None]
    for cartilage in ("fc", "tc"):
        np.testing.assert_array_equal(
            remote.neighbour_maps(cartilage, rows), local.neighbour_maps(cartilage, rows)
        )
