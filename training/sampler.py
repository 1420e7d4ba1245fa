"""Longitudinally-aware batches (DESIGN.md, The method).

Each epoch draws ONE visit per knee (subject, side) at random, shuffles the knees and cuts them
into batches, so no batch holds two visits of the same knee and no visit of a knee is ever a
negative for another visit of it. The two knees of one subject are different knees and may meet
in a batch (as in the reference code). Validation and recall use each knee's first visit
(``first_visits``).

The draw is a pure function of ``(seed, epoch)``: the sampler's whole state is those two
numbers, so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


def group_by_knee(knee_ids: Sequence[str]) -> dict[str, list[int]]:
    """knee id -> row positions, knees and rows in first-seen order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, knee in enumerate(knee_ids):
        groups[knee].append(position)
    return dict(groups)


def first_visits(knee_ids: Sequence[str], visit_months: Sequence[int]) -> list[int]:
    """Row position of each knee's first (earliest) visit, knees in first-seen order."""
    return [
        min(rows, key=lambda r: (visit_months[r], r)) for rows in group_by_knee(knee_ids).values()
    ]


class KneeVisitSampler:
    """Yields batches (lists of row positions) for one epoch; ``drop_last`` drops a final batch
    smaller than 2 (the loss needs a negative)."""

    def __init__(self, knee_ids: Sequence[str], batch_size: int, seed: int):
        if batch_size < 2:
            raise ValueError("batch size must be at least 2 (the loss needs negatives)")
        self.groups = list(group_by_knee(knee_ids).values())
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.batch_size = state["seed"], state["epoch"], state["batch_size"]

    def epoch_rows(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = [rows[int(rng.integers(len(rows)))] for rows in self.groups]
        order = rng.permutation(len(chosen))
        return [chosen[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.epoch_rows()
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            if len(batch) >= 2:
                yield batch

    def __len__(self) -> int:
        full, rest = divmod(len(self.groups), self.batch_size)
        return full + (1 if rest >= 2 else 0)
