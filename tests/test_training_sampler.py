"""Longitudinally-aware sampler: one visit per knee per epoch, never two visits of a knee in a
batch."""

from __future__ import annotations

from collections import Counter

from mris.training.sampler import KneeVisitSampler, first_visits


def _rows():
    knees, months = [], []
    for subject in range(13):
        for side in ("LEFT", "RIGHT"):
            for month in (0, 12, 24, 36, 48)[: 1 + (subject + len(side)) % 5]:
                knees.append(f"S{subject}:{side}")
                months.append(month)
    return knees, months


def test_one_visit_per_knee_per_epoch_and_no_knee_twice_in_a_batch():
    knees, _ = _rows()
    sampler = KneeVisitSampler(knees, batch_size=8, seed=3)
    seen_choices = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        drawn = [row for batch in batches for row in batch]
        per_knee = Counter(knees[row] for row in drawn)
        assert set(per_knee) == set(knees)  # every knee (26 knees, batches of 8: last has 2)
        assert max(per_knee.values()) == 1
        for batch in batches:
            assert len({knees[row] for row in batch}) == len(batch)
        seen_choices.add(tuple(sorted(drawn)))
    assert len(seen_choices) > 1  # visits are redrawn each epoch


def test_draw_is_a_function_of_seed_and_epoch():
    knees, _ = _rows()
    a, b = KneeVisitSampler(knees, 8, seed=3), KneeVisitSampler(knees, 8, seed=3)
    a.set_epoch(4)
    b.load_state_dict({"seed": 3, "epoch": 4, "batch_size": 8})
    assert list(a) == list(b)


def test_first_visits_pick_the_earliest_visit_of_each_knee():
    knees, months = _rows()
    first = first_visits(knees, months)
    assert len(first) == len(set(knees))
    assert all(months[row] == 0 for row in first)
