"""Index build throughput versus the bare ONNX thickness encoder at the same batch size.

Bare: the region encoders (``mris.encoders.OnnxEncoder``) on inputs prepared in advance —
the ceiling. Pipeline: ``mris index build`` (``build_index_bundle``) on the same rows, which also
reads the .npy maps, preprocesses them (NaN -> 0, / 3, resize to the encoder size) in its thread
pool, writes the maps arrays and builds and verifies the index. Reported: maps per second of
each and the ratio (goal >= 0.8), both over the embedding stage, plus the whole build's rate.

Model: ``--model MODEL_DIR`` (a trained/exported bundle), else a ResNet-18 bundle (random init,
exported by ``mris.training``'s ``export_onnx`` in a subprocess — torch is needed for that step
only) at ``--encoder-px`` (256). Maps: ``--pairs`` knee-visits of 310 x 310 maps from
``tests/bundle_factory``.

    python benchmarks/bench_index_build.py --pairs 96 --batch-size 16
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

EXPORT = (
    r"""
import sys, torch
from pathlib import Path
from mris.constants import CARTILAGES
from mris.training.models import ModelConfig, build_model
from mris.training.export import export_onnx
root, px = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
for name in CARTILAGES:
    for modality in ("radiograph", "thickness"):
        export_onnx(build_model(ModelConfig(kind="encoder")),"""
    r""" root / f"separate-{name}-{modality}.onnx", (px, px), ["embedding"])
"""
)


def resnet_bundle(root: Path, px: int) -> Path:
    from datetime import datetime, timezone

    from mris.constants import CARTILAGES, PREPROCESSING_VERSION, PreprocessConfig
    from mris.model_bundle import EncoderPair, ModelCard, VariantCard, write_model_card

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", EXPORT, str(root), str(px)], check=True)
    pairs = {
        r: EncoderPair(
            radiograph=f"separate-{r}-radiograph.onnx",
            thickness=f"separate-{r}-thickness.onnx",
            radiograph_input_px=(px, px),
            thickness_input_px=(px, px),
        )
        for r in CARTILAGES
    }
    card = ModelCard(
        created=datetime.now(timezone.utc).isoformat(),
        preprocess=PreprocessConfig(encoder_px=px).to_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        variants={"separate": VariantCard(regions=pairs)},
        training={"note": "random-init ResNet-18 for benchmarks"},
    )
    write_model_card(root, card)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="model bundle directory (default: export a random-init ResNet-18)"
    )
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoder-px", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workdir")
    args = parser.parse_args()

    from bundle_factory import make_map_cohort

    from mris.constants import CARTILAGES
    from mris.encoders import OnnxEncoder, default_threads
    from mris.index.build import build_index_bundle
    from mris.index.embed import region_inputs
    from mris.manifest import read_manifest
    from mris.model_bundle import load_model_bundle
    from mris.thickness import load_thickness_map

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mris-bench-build-"))
    try:
        model_dir = (
            Path(args.model) if args.model else resnet_bundle(work / "model", args.encoder_px)
        )
        model = load_model_bundle(model_dir)
        config = model.card.preprocess_config
        manifest_path = make_map_cohort(work / "cohort", args.pairs, shape=(310, 310))
        manifest = read_manifest(manifest_path)
        threads = args.threads or default_threads()

        # bare encoder: inputs prepared beforehand, same batch size and threads
        prepared = {"fc": [], "tc": []}
        for row in manifest.rows:
            inputs = region_inputs(
                "separate",
                load_thickness_map(manifest.resolve_path(row.fc_path)),
                load_thickness_map(manifest.resolve_path(row.tc_path)),
                config,
            )
            for region in prepared:
                prepared[region].append(inputs[region])
        encoders = {
            r: OnnxEncoder(
                model.encoder_path("separate", r, "thickness"),
                device="cpu",
                intra_op_threads=threads,
                batch_size=args.batch_size,
            )
            for r in CARTILAGES
        }
        batches = {r: np.stack(v)[:, None] for r, v in prepared.items()}
        for r in encoders:  # warm-up
            encoders[r].embed(batches[r][: args.batch_size])
        t = time.perf_counter()
        for start in range(0, args.pairs, args.batch_size):
            for r in encoders:
                encoders[r].embed(batches[r][start : start + args.batch_size])
        bare = time.perf_counter() - t
        del encoders

        t = time.perf_counter()
        result = build_index_bundle(
            model_dir,
            manifest_path,
            work / "index",
            batch_size=args.batch_size,
            threads=threads,
            device="cpu",
        )
        whole = time.perf_counter() - t
        bare_rate = args.pairs / bare
        pipe_rate = result.new_rows / result.embed_seconds
        print(
            f"model {model_dir} ({args.encoder_px}px), {args.pairs} knee-visits (2 maps "
            f"each, 2 encoders), batch {args.batch_size}, {threads} threads"
        )
        print(
            f"bare encoders:  {bare_rate:.2f} pairs/s ({1000 * bare / args.pairs / 2:.1f} ms "
            "per map)"
        )
        print(
            f"build pipeline: {pipe_rate:.2f} pairs/s over embedding; whole build incl. "
            f"index, card, verify: {args.pairs / whole:.2f} pairs/s"
        )
        print(f"ratio: {pipe_rate / bare_rate:.2f} of bare encoder throughput (goal >= 0.80)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
