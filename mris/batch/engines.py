"""The batch job's engines: ``local`` (this process: one ``Pipeline``, one decode sandbox) and
``ray`` (Ray Data: the pending shards as a dataset, ``map_batches`` over an actor pool, one
``Pipeline`` with its ONNX sessions per actor, CPU or GPU by the actor's resources). Both run
``mris.batch.shard.run_shard`` on each shard not yet complete, so both write the same rows.
Each pipeline decodes and finds knees in ``sandbox_workers + 1`` threads: while one waits for
a decode in the sandbox, another runs the localiser.

With Ray every actor writes its shards' files itself: ``OUT``, the model and the index bundle
must be at the same path on every node (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mris.batch.plan import (
    FAILURES_DIR,
    ROWS_DIR,
    SUMMARY_FILE,
    BatchInputs,
    JobSpec,
    Shard,
    check_job,
    is_complete,
    remove_partial_files,
)
from mris.batch.shard import (
    BatchSettings,
    Decode,
    ShardOutcome,
    finish_shard,
    prepare_shard,
    run_shard,
)
from mris.errors import BadParameter
from mris.fsutil import atomic_write_json

ENGINES = ("local", "ray")


@dataclass
class BatchReport:
    """What a run did and what the output holds (``summary.json`` when ``complete``)."""

    out: str
    engine: str
    inputs: int
    shards: int
    shards_run: int
    shards_skipped: int  # complete before this run (a resume)
    knees: int  # in the whole output
    failures: int
    failure_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    knees_per_second: float = 0.0  # this run's knees over its wall time
    complete: bool = False


@dataclass(frozen=True)
class PipelineSpec:
    """What loads the job's pipeline anywhere (this process or a Ray actor)."""

    model: str
    bundle: str
    variant: str
    device: str = "auto"
    threads: int = 0
    sandbox_workers: int = 1  # decode processes; 0 decodes in-process (trusted files only)
    decode_memory_mb: int = 2048
    decode_timeout_s: float = 60.0

    def load(self):
        from mris.pipeline import Pipeline

        return Pipeline.load(
            self.model, self.bundle, self.variant, self.device, intra_op_threads=self.threads
        )


@contextmanager
def decoder(spec: PipelineSpec, pipeline, settings: BatchSettings) -> Iterator[Decode]:
    """path -> ``Radiograph``: in the decode sandbox (``spec.sandbox_workers`` processes), or
    in-process when it is 0."""
    from mris.dicom import read_radiograph
    from mris.sandbox import DecodeSandbox

    if spec.sandbox_workers <= 0:
        yield lambda path: read_radiograph(
            path, spacing_mm=settings.spacing_mm, limits=pipeline.limits
        )
        return
    sandbox = DecodeSandbox(
        workers=spec.sandbox_workers,
        memory_mb=spec.decode_memory_mb,
        timeout_s=spec.decode_timeout_s,
    ).start()
    try:
        yield lambda path: sandbox.read(path, settings.spacing_mm, pipeline.limits)
    finally:
        sandbox.close()


def job_spec(
    inputs: BatchInputs, spec: PipelineSpec, settings: BatchSettings, shard_size: int
) -> JobSpec:
    from mris.index.card import read_card
    from mris.model_bundle import load_model_bundle

    model_card = load_model_bundle(spec.model, verify=False).card
    card = read_card(Path(spec.bundle))
    return JobSpec(
        inputs_digest=inputs.digest,
        inputs=len(inputs.files),
        shard_size=shard_size,
        model=str(Path(spec.model).resolve()),
        model_created=str(model_card.created),
        index_bundle=str(Path(spec.bundle)),
        index_version=card.version,
        variant=spec.variant,
        k=settings.k,
        nan_rule=settings.nan_rule,
        maps_dtype=settings.maps_dtype,
    )


def run_batch(
    inputs: BatchInputs,
    out: str | Path,
    spec: PipelineSpec,
    settings: BatchSettings,
    *,
    shard_size: int,
    engine: str = "local",
    ray_address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BatchReport:
    """Run (or resume) a batch job into ``out``. ``on_start(inputs, done)`` once, then
    ``on_progress(inputs, knees)`` as inputs finish (the local engine: each input, then each
    shard's knees; Ray: each shard). Returns the report; ``summary.json`` is
    written when every shard is complete."""
    from mris.index.publish import resolve

    if engine not in ENGINES:
        raise BadParameter(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    started = time.perf_counter()
    out = Path(out)
    spec = PipelineSpec(**{**asdict(spec), "bundle": str(resolve(spec.bundle))})  # pinned
    check_job(out, job_spec(inputs, spec, settings, shard_size))
    remove_partial_files(out)
    shards = inputs.shards(shard_size)
    pending = [shard for shard in shards if not is_complete(out, shard)]
    done_inputs = sum(len(shard.files) for shard in shards) - sum(len(s.files) for s in pending)
    if on_start is not None:
        on_start(len(inputs.files), done_inputs)
    outcomes: list[ShardOutcome] = []
    if pending:
        run = _run_local if engine == "local" else _run_ray
        extra = (
            {}
            if engine == "local"
            else {
                "ray_address": ray_address,
                "actors": actors,
                "cpus_per_actor": cpus_per_actor,
                "gpus_per_actor": gpus_per_actor,
            }
        )
        outcomes = run(pending, out, spec, settings, on_progress=on_progress, **extra)
    seconds = time.perf_counter() - started
    report = _report(out, engine, inputs, shards, outcomes, seconds)
    if report.complete:
        remove_partial_files(out)  # what a killed Ray worker left beside a redone shard
        atomic_write_json(out / SUMMARY_FILE, asdict(report))
    return report


def _run_local(
    pending: list[Shard],
    out: Path,
    spec: PipelineSpec,
    settings: BatchSettings,
    *,
    on_progress: Callable[[int, int], None] | None,
) -> list[ShardOutcome]:
    """The shards in order, two at a time: while this thread searches, synthesizes and writes
    one shard, a second thread decodes the next one and finds its knees (the decode waits on
    the sandbox, the search on ONNX: overlapped they keep both cores busy)."""
    pipeline = spec.load()
    outcomes = []
    on_input = None if on_progress is None else lambda: on_progress(1, 0)
    with decoder(spec, pipeline, settings) as decode:
        ahead = ThreadPoolExecutor(1, thread_name_prefix="mris-batch-ahead")

        def prepare(shard: Shard):
            return ahead.submit(
                prepare_shard,
                pipeline,
                decode,
                shard,
                settings,
                spec.sandbox_workers + 1,
                on_input,
            )

        try:
            next_ready = prepare(pending[0])
            for position in range(len(pending)):
                ready = next_ready.result()
                if position + 1 < len(pending):
                    next_ready = prepare(pending[position + 1])
                outcome = finish_shard(pipeline, ready, settings, out)
                outcomes.append(outcome)
                if on_progress is not None:
                    on_progress(0, outcome.knees)
        finally:
            # Interrupted: do not wait for the shard being decoded (closing the sandbox ends it).
            ahead.shutdown(wait=False, cancel_futures=True)
    return outcomes


class ShardActor:
    """A Ray Data actor: one pipeline (ONNX sessions, index) and one decode sandbox for its
    life; each call runs the shards of its batch (``batch_size=1``: one shard)."""

    def __init__(self, spec: dict, settings: dict, out: str) -> None:
        import ray

        gpus = ray.get_gpu_ids()
        self.spec = PipelineSpec(**{**spec, "device": "cuda" if gpus else "cpu"})
        self.settings = BatchSettings(**settings)
        self.out = Path(out)
        self.pipeline = self.spec.load()
        self._decoder = decoder(self.spec, self.pipeline, self.settings)
        self.decode = self._decoder.__enter__()

    def __call__(self, batch: dict) -> dict:
        outcomes = []
        for number, files, sources in zip(batch["number"], batch["files"], batch["sources"]):
            shard = Shard(int(number), tuple(json.loads(files)), tuple(json.loads(sources)))
            outcomes.append(
                run_shard(
                    self.pipeline,
                    self.decode,
                    shard,
                    self.settings,
                    self.out,
                    decode_threads=self.spec.sandbox_workers + 1,
                )
            )
        return {key: [getattr(o, key) for o in outcomes] for key in ShardOutcome.__annotations__}


def _run_ray(
    pending: list[Shard],
    out: Path,
    spec: PipelineSpec,
    settings: BatchSettings,
    *,
    on_progress: Callable[[int, int], None] | None,
    ray_address: str | None,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
) -> list[ShardOutcome]:
    from mris.ray_engine import connected, map_with_actors

    threads = max(1, int(cpus_per_actor))
    actor_spec = {**asdict(spec), "threads": spec.threads or threads}
    items = [
        {
            "number": shard.number,
            "files": json.dumps(shard.files),
            "sources": json.dumps(shard.sources),
        }
        for shard in pending
    ]
    outcomes = []
    with connected(ray_address) as ray:
        dataset = map_with_actors(
            ray,
            items,
            ShardActor,
            {"spec": actor_spec, "settings": asdict(settings), "out": str(out.resolve())},
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
        )
        for row in dataset.iter_rows():
            outcome = ShardOutcome(**{key: row[key] for key in ShardOutcome.__annotations__})
            outcomes.append(outcome)
            if on_progress is not None:
                on_progress(outcome.inputs, outcome.knees)
    return outcomes


def _report(
    out: Path,
    engine: str,
    inputs: BatchInputs,
    shards: list[Shard],
    outcomes: list[ShardOutcome],
    seconds: float,
) -> BatchReport:
    """Counts over the whole output (this run's shards and earlier runs')."""
    import pyarrow.parquet as pq

    complete = [shard for shard in shards if is_complete(out, shard)]
    knees = sum(pq.read_metadata(out / ROWS_DIR / f"{s.name}.parquet").num_rows for s in complete)
    reasons: Counter[str] = Counter()
    for shard in complete:
        path = out / FAILURES_DIR / f"{shard.name}.parquet"
        reasons.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    run_knees = sum(o.knees for o in outcomes)
    return BatchReport(
        out=str(out),
        engine=engine,
        inputs=len(inputs.files),
        shards=len(shards),
        shards_run=len(outcomes),
        shards_skipped=len(shards) - len(outcomes),
        knees=knees,
        failures=sum(reasons.values()),
        failure_reasons=dict(sorted(reasons.items())),
        seconds=round(seconds, 3),
        knees_per_second=round(run_knees / seconds, 3) if seconds > 0 else 0.0,
        complete=len(complete) == len(shards),
    )


__all__ = ["BatchReport", "ENGINES", "PipelineSpec", "ShardActor", "decoder", "run_batch"]
