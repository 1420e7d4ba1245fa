"""Stage 3 of an index build on Ray (``mris index build --engine ray``): the rows to embed as a
Ray dataset of chunks, ``map_batches`` over an actor pool where each actor holds the thickness
encoders (one ONNX session per region, CPU or GPU by the actor's resources) and loads, prepares
and embeds its chunks with the local build's own functions (``embed._load_row``, the same
encoders). The driver takes the chunks back in row order and decides each row exactly as the
local stream does (``embed.admit``: the first usable map sets the shape, unusable rows stop the
build or are skipped), writes the maps and fills the embeddings: the bundle is the local one
(same rows; embeddings equal up to the encoders' batch arithmetic, within 1e-6).

The manifest's files and the model must be at the same paths on every node.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from mris.constants import PreprocessConfig
from mris.errors import ManifestError
from mris.index.embed import EmbeddedRows, _load_row, _Loaded, admit
from mris.manifest import ManifestRow

CHUNK_BATCHES = 4
"""Encoder batches per Ray task: enough work per task to hide its scheduling cost."""


class EmbedActor:
    """One actor: the manifest, the preprocessing and each region's thickness encoder."""

    def __init__(
        self, manifest_path: str, model_dir: str, variant: str, batch_size: int, threads: int
    ) -> None:
        import ray

        from mris.encoders import OnnxEncoder
        from mris.manifest import read_manifest
        from mris.model_bundle import VARIANT_REGIONS, load_model_bundle

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        model = load_model_bundle(model_dir)
        self.manifest = read_manifest(manifest_path)
        self.variant = variant
        self.config: PreprocessConfig = model.card.preprocess_config
        self.encoders = {
            region: OnnxEncoder(
                model.encoder_path(variant, region, "thickness"),
                device=device,
                intra_op_threads=threads,
                batch_size=batch_size,
            )
            for region in VARIANT_REGIONS[variant]
        }

    def __call__(self, batch: dict) -> dict:
        payloads = []
        for first, rows_json in zip(batch["first"], batch["rows"]):
            rows = [ManifestRow(**record) for record in json.loads(rows_json)]
            loaded = [
                _load_row(self.manifest, row, int(first) + i, self.variant, self.config)
                for i, row in enumerate(rows)
            ]
            good = [item for item in loaded if item.error is None]
            embedded = {}
            if good:
                for region, encoder in self.encoders.items():
                    images = np.stack([item.inputs[region] for item in good])[:, None]
                    embedded[region] = encoder.embed(images)
            position = {item.index: i for i, item in enumerate(good)}
            records = [
                (
                    item.index,
                    item.fc,
                    item.tc,
                    item.error,
                    item.reason,
                    {r: e[position[item.index]] for r, e in embedded.items()}
                    if item.error is None
                    else None,
                )
                for item in loaded
            ]
            payloads.append(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
        return {"payload": payloads}


def embed_rows_ray(
    manifest_path: str,
    rows: Sequence[ManifestRow],
    model_dir: str,
    variant: str,
    dims: dict[str, int],
    on_maps: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    skip_bad: bool = False,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
    *,
    ray_address: str | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> EmbeddedRows:
    """``embed.embed_rows`` on Ray: the same ``EmbeddedRows`` for the same rows."""
    from mris.ray_engine import connected, map_with_actors

    if not rows:
        raise ManifestError("no rows to embed")
    started = time.perf_counter()
    n = len(rows)
    chunk = batch_size * CHUNK_BATCHES
    items = [
        {"first": start, "rows": json.dumps([asdict(row) for row in rows[start : start + chunk]])}
        for start in range(0, n, chunk)
    ]
    embeddings = {region: np.zeros((n, dim), np.float32) for region, dim in dims.items()}
    keep = np.ones(n, bool)
    skipped: dict[str, list[str]] = {}
    map_shape: tuple[int, int] | None = None
    with connected(ray_address) as ray:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = map_with_actors(
            ray,
            items,
            EmbedActor,
            {
                "manifest_path": str(manifest_path),
                "model_dir": str(model_dir),
                "variant": variant,
                "batch_size": batch_size,
                "threads": max(1, int(cpus_per_actor)),
            },
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
        )
        for result in dataset.iter_rows():
            records = pickle.loads(result["payload"])
            for index, fc, tc, error, reason, vectors in records:
                item = _Loaded(index, fc=fc, tc=tc, error=error, reason=reason)
                map_shape = admit(item, rows, map_shape, skip_bad, keep, skipped)
                if item.error is not None:
                    continue
                if on_maps is not None:
                    on_maps(index, fc, tc)
                for region, vector in vectors.items():
                    embeddings[region][index] = vector
            if on_progress is not None:
                on_progress(len(records))
    return EmbeddedRows(
        keep=keep,
        embeddings=embeddings,
        skipped=skipped,
        map_shape=map_shape,
        seconds=time.perf_counter() - started,
    )


__all__ = ["EmbedActor", "embed_rows_ray"]
