"""Training throughput: image pairs per second of one encoder-pair training step.

For the ``quick`` profile on the CPU (and for ``paper`` when a CUDA device is present), random
inputs of the profile's size, the real model, loss, augmentation and optimiser; the first steps
are warm-up. Prints one JSON line per setting.

    python benchmarks/bench_training.py [--steps 10] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mris.training.augment import augment_radiographs
from mris.training.losses import triplet_loss
from mris.training.models import ModelConfig, build_model
from mris.training.profiles import get_profile
from mris.training.trainer import batch_generator, set_determinism


def bench(profile_name: str, device: torch.device, steps: int, warmup: int = 2) -> dict:
    profile = get_profile(profile_name)
    s, n = profile.encoder_px, profile.batch_size
    f = build_model(ModelConfig("encoder")).to(device).train()
    g = build_model(ModelConfig("encoder")).to(device).train()
    optimizer = torch.optim.AdamW(
        [
            {"params": f.parameters(), "lr": profile.lr_radiograph},
            {"params": g.parameters(), "lr": profile.lr_thickness},
        ],
        weight_decay=profile.weight_decay,
    )
    x = torch.rand(n, 1, s, s, device=device)
    y = torch.rand(n, 1, s, s, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    timings = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        xa = augment_radiographs(x, batch_generator(0, 0, step), profile.augmentation)
        with autocast:
            fx, gy = f(xa), g(y)
        loss = triplet_loss(fx.float(), gy.float(), profile.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(f.parameters(), profile.grad_clip)
        torch.nn.utils.clip_grad_norm_(g.parameters(), profile.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    per_step = sorted(timings)[len(timings) // 2]
    return {
        "profile": profile_name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input_px": s,
        "batch": n,
        "median_step_s": round(per_step, 4),
        "pairs_per_s": round(n / per_step, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_determinism(0, args.threads)
    results = [bench("quick", torch.device("cpu"), args.steps)]
    if torch.cuda.is_available():
        results.append(bench("quick", torch.device("cuda"), args.steps))
        results.append(bench("paper", torch.device("cuda"), args.steps))
    for result in results:
        print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
