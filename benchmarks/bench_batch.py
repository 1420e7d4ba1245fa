"""Batch synthesis throughput: ``mris synthesize-batch`` with the local engine and with Ray on
this machine, against the compute floor, measured in one run on the same radiographs.

    python benchmarks/bench_batch.py --workdir mris-demo [--radiographs 48] [--ray]

- floor: the bare work every knee needs, in this process: decode each file
  (``read_radiograph``), the localiser's ONNX passes and the ROI cut (``Pipeline.prepare``),
  then the radiograph encoders' ONNX passes over all ROIs in batches of 64. No FAISS, no
  synthesis, no writes, no sandbox.
- local: ``run_batch(engine="local")`` into a new folder (decode sandbox, FAISS, eq. 4, Parquet
  rows, float16 map shards).
- ray (with ``--ray``): ``run_batch(engine="ray")`` on a local Ray cluster of this machine's
  CPUs, one actor per CPU with one ONNX thread each; its start-up (cluster, actors loading the
  pipeline) is in the time, as a user sees it.

Prints knees/s for each over the whole job as a user runs it, start-up included (loading the
pipeline, starting the decode sandbox; for Ray also the cluster and its actors), so run it on
enough radiographs (default: the demo cohort's 1,017) that start-up is a small part; the ratios
local/floor (goal >= 0.8) and ray/local (goal >= 0.7); then the per-knee cost and an estimate
of the machines and hours for 1 million radiographs from it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _radiographs(workdir: Path, count: int, splits: list[str]) -> list[str]:
    from mris.batch.plan import inputs_from_manifest

    inputs = inputs_from_manifest(workdir / "cohort" / "manifest.csv", splits)
    return list(inputs.sources[:count])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mris-demo"))
    parser.add_argument("--radiographs", type=int, default=2000)
    parser.add_argument(
        "--splits", default="", help="manifest splits to take radiographs from (default: all)"
    )
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--ray", action="store_true", help="also measure the Ray engine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (floor and local)")
    args = parser.parse_args()

    from mris.batch.engines import PipelineSpec, run_batch
    from mris.batch.plan import BatchInputs
    from mris.batch.shard import BatchSettings
    from mris.dicom import read_radiograph
    from mris.options import RequestOptions
    from mris.roi import stack_rois

    workdir = args.workdir.resolve()
    cohort = workdir / "cohort"
    splits = [s for s in args.splits.split(",") if s]
    sources = _radiographs(workdir, args.radiographs, splits)
    inputs = BatchInputs(cohort, tuple(str(cohort / s) for s in sources), tuple(sources))
    cpus = len(os.sched_getaffinity(0))
    spec = PipelineSpec(
        model=str(workdir / "model"),
        bundle=str(workdir / "index"),
        variant="separate",
        device=args.device,
    )
    settings = BatchSettings(k=20, nan_rule="majority", maps_dtype="float16")
    print(f"{len(sources)} radiographs of {workdir}, {cpus} CPUs, device {args.device}")

    # floor ------------------------------------------------------------------------------
    pipeline = spec.load()
    options = RequestOptions()
    for path in inputs.files[:2]:  # warm-up: ONNX sessions, page cache
        pipeline.prepare(read_radiograph(path), options)
    started = time.perf_counter()
    decode_s = prepare_s = 0.0
    rois = []
    for path in inputs.files:
        t0 = time.perf_counter()
        radiograph = read_radiograph(path)
        t1 = time.perf_counter()
        rois.extend(pipeline.prepare(radiograph, options).rois)
        prepare_s += time.perf_counter() - t1
        decode_s += t1 - t0
    t2 = time.perf_counter()
    for start in range(0, len(rois), 64):
        batch = stack_rois(rois[start : start + 64])
        for encoder in pipeline.encoders.values():
            encoder.embed(batch)
    encode_s = time.perf_counter() - t2
    floor_s = time.perf_counter() - started
    knees = len(rois)
    floor = knees / floor_s
    print(
        f"floor: {knees} knees in {floor_s:.1f} s = {floor:.2f} knees/s (decode "
        f"{1000 * decode_s / len(sources):.0f} ms/radiograph, localiser + ROIs "
        f"{1000 * prepare_s / len(sources):.0f} ms/radiograph, encoders "
        f"{1000 * encode_s / knees:.1f} ms/knee)"
    )
    del pipeline

    work = Path(tempfile.mkdtemp(prefix="mris-bench-batch-"))
    try:
        results = {}
        engines = ["local"] + (["ray"] if args.ray else [])
        for engine in engines:
            extra = {}
            if engine == "ray":
                extra = {"actors": cpus, "cpus_per_actor": 1.0}
            shards_done: list[tuple[float, int]] = []  # (time, knees) per finished shard

            def on_progress(_inputs: int, shard_knees: int, done=shards_done) -> None:
                if shard_knees:
                    done.append((time.perf_counter(), shard_knees))

            t = time.perf_counter()
            report = run_batch(
                inputs,
                work / engine,
                spec,
                settings,
                shard_size=args.shard_size,
                engine=engine,
                on_progress=on_progress,
                **extra,
            )
            seconds = time.perf_counter() - t
            assert report.complete and report.knees == knees, report
            results[engine] = knees / seconds
            print(
                f"{engine}: {knees} knees in {seconds:.1f} s = {results[engine]:.2f} knees/s, "
                f"start-up included (first shard written after {shards_done[0][0] - t:.1f} s)"
            )
        local = results["local"]
        print(f"local / floor: {local / floor:.2f} (goal >= 0.8)")
        if "ray" in results:
            print(f"ray / local: {results['ray'] / local:.2f} (goal >= 0.7)")
            _same_rows(work / "local", work / "ray")
        per_knee_core_s = cpus / local  # core-seconds per knee, local engine
        print(
            f"cost: {1000 * per_knee_core_s:.0f} core-ms per knee ({cpus} cores busy) -> "
            f"1 million radiographs (2 million knees) = {2e6 * per_knee_core_s / 3600:,.0f} "
            "core-hours"
        )
        for machines, cores in ((1, cpus), (10, 32), (50, 32)):
            hours = 2e6 * per_knee_core_s / (machines * cores) / 3600
            print(f"  {machines} machine(s) x {cores} cores: {hours:,.1f} h")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _same_rows(a: Path, b: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    left = pq.read_table(a / "rows").to_pandas().sort_values("knee_id").reset_index(drop=True)
    right = pq.read_table(b / "rows").to_pandas().sort_values("knee_id").reset_index(drop=True)
    assert left["knee_id"].tolist() == right["knee_id"].tolist()
    assert left["fc_neighbours"].map(list).tolist() == right["fc_neighbours"].map(list).tolist()
    np.testing.assert_allclose(left["fc_mean_mm"], right["fc_mean_mm"], rtol=1e-5)
    print("local and ray rows: the same knees, neighbours and means")


if __name__ == "__main__":
    sys.exit(main())
