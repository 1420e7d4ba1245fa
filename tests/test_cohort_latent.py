"""Latent model: KL grade rules, monotone progression, splits."""

from __future__ import annotations

from mris.cohort import latent


def test_kl_grade_rules():
    assert latent.kl_grade(0.0, 0.0) == 0
    assert latent.kl_grade(0.0, 1.0) == 1  # doubtful osteophyte
    assert latent.kl_grade(0.05, 3.0) == 2  # definite osteophyte
    assert latent.kl_grade(0.4, 3.0) == 3  # definite narrowing
    assert latent.kl_grade(0.7, 6.0) == 4  # marked narrowing, large osteophytes


def test_kl_never_decreases_and_progressor_flag_matches():
    for index in range(40):
        subject = latent.sample_subject(1, index, 40, "database")
        for knee in subject.knees.values():
            grades = [latent.knee_state(knee, m).klg for m in (0, 12, 24, 36, 48, 72, 96)]
            assert grades == sorted(grades)
            assert latent.is_progressor(knee) == int(grades[5] > grades[0])  # month 72


def test_splits_follow_paper_proportions():
    splits = latent.assign_splits(4647, seed=3)
    assert splits.count("database") == 2000 and splits.count("downstream") == 1750
    assert splits.count("test") == 897


def test_subject_is_deterministic():
    a = latent.sample_subject(9, 5, 10, "test")
    b = latent.sample_subject(9, 5, 10, "test")
    assert a.visits == b.visits and a.knees["LEFT"].anatomy == b.knees["LEFT"].anatomy
