"""Cohort generation throughput: knee-visits per second and peak memory.

    python benchmarks/bench_cohort.py [--subjects 40] [--image-size small|medium|full] [--workers 1]

Writes into a temporary folder that is removed afterwards. Peak memory is the maximum
resident set size of this process and of its worker processes (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mris.cohort.generate import CohortConfig, generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--image-size", default="small", choices=("small", "medium", "full"))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        config = CohortConfig(
            out=Path(tmp) / "cohort",
            subjects=args.subjects,
            seed=args.seed,
            image_size=args.image_size,
            workers=args.workers,
        )
        start = time.perf_counter()
        summary = generate_cohort(config)
        seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"subjects {summary.n_subjects}  knee-visits {summary.n_pairs}  radiographs "
        f"{summary.n_radiographs}"
    )
    print(f"time {seconds:.1f} s  ->  {summary.n_pairs / seconds:.1f} knee-visits/s")
    print(
        f"disk {summary.disk_bytes / 1e6:.1f} MB "
        f"({summary.disk_bytes / max(summary.n_subjects, 1) / 1e6:.2f} MB/subject)"
    )
    print(f"peak RSS: main {own:.0f} MiB, largest worker {children:.0f} MiB")


if __name__ == "__main__":
    main()
