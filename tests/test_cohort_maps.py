"""Atlas-space maps: no seam at the compartment boundary, an outline that does not follow the
visible bone, denuded areas in severe OA (latents + maps only, no radiographs)."""

from __future__ import annotations

import numpy as np

from mris.cohort import latent, maps

GRID = 128


def _knees(n_subjects: int, seed: int = 3):
    for index in range(n_subjects):
        subject = latent.sample_subject(seed, index, n_subjects, "test")
        yield from subject.knees.values()


def test_no_seam_at_the_femoral_compartment_boundary():
    """Mean |jump| between neighbouring columns, averaged over knees: the two middle columns
    (where the medial and lateral condyles meet in the trochlea) are like the others."""
    per_knee = []
    for knee in _knees(20):
        fc = maps.thickness_maps(knee, latent.knee_state(knee, 0), GRID).fc
        jumps = np.abs(np.diff(fc, axis=1))
        inside = ~np.isnan(jumps)
        per_knee.append(np.where(inside, jumps, 0).sum(axis=0) / np.maximum(inside.sum(axis=0), 1))
    mean_jump = np.mean(per_knee, axis=0)
    columns = mean_jump[mean_jump > 0]
    midline = mean_jump[GRID // 2 - 1]
    assert midline > 0  # the trochlea joins the condyles there: the columns are inside FC
    assert midline <= 1.5 * np.median(columns)
    assert midline <= np.percentile(columns, 90)


def test_outline_does_not_follow_the_visible_bone_size():
    areas, widths, notches, shares = [], [], [], []
    for knee in _knees(150):
        areas.append(maps.fc_mask(knee, 64).sum() + sum(m.sum() for m in maps.tc_masks(knee, 64)))
        widths.append(knee.anatomy.femur_width)
        notches.append(knee.anatomy.notch_width)
        shares.append(knee.anatomy.medial_share)
    for visible in (widths, notches, shares):
        assert abs(np.corrcoef(areas, visible)[0, 1]) < 0.2
    # Atlas space: small residual variation only (a few per cent of the area).
    assert np.std(areas) / np.mean(areas) < 0.06


def test_severe_oa_denudes_the_central_zone_inside_the_outline():
    knee = next(k for k in _knees(40) if k.worse_compartment == "medial")
    healthy = latent.KneeState(
        month=0,
        severity=0.5,
        narrowing_medial=0.0,
        narrowing_lateral=0.0,
        osteophyte_mm=0.0,
        sclerosis=0.0,
        klg=0,
        thinning=0.0,
    )
    severe = latent.KneeState(
        month=0,
        severity=4.8,
        narrowing_medial=0.85,
        narrowing_lateral=0.2,
        osteophyte_mm=6.0,
        sclerosis=1.0,
        klg=4,
        thinning=0.0,
    )
    before = maps.thickness_maps(knee, healthy, GRID)
    after = maps.thickness_maps(knee, severe, GRID)
    # Same outline (NaN pattern), denuded cells (< 0.1 mm) inside it, on the medial side.
    assert np.array_equal(np.isnan(before.fc), np.isnan(after.fc))
    denuded = after.fc < 0.1
    assert denuded.sum() > 20 and not (before.fc < 0.1).any()
    columns = np.nonzero(denuded)[1]
    assert (columns < GRID // 2).all()
