"""Realism: the cohort's figures against the OAI ranges of COHORT_FACTS.md (latents + maps
only, no radiographs rendered, so it stays fast)."""

from __future__ import annotations

from mris.cohort.generate import simulate_records
from mris.cohort.stats import check_realism, cohort_stats


def test_cohort_figures_match_oai_ranges():
    n_subjects = 400
    stats = cohort_stats(simulate_records(n_subjects, seed=5, grid=64), n_subjects=n_subjects)
    assert check_realism(stats) == []
    # KL2 thickness barely differs from KL0; KL3-4 clearly lower (COHORT_FACTS.md).
    by_klg = stats["mean_fc_mm_by_klg"]
    assert abs(by_klg["2"] - by_klg["0"]) < 0.2
    assert by_klg["3"] < by_klg["0"] - 0.1
    # Lateral tibia thicker than medial tibia (Eckstein 2010).
    assert stats["plate_mean_mm"]["tc_lateral"] > stats["plate_mean_mm"]["tc_medial"]
    # Calibrated signal: the cross-sectional JSW-thickness r is in REFERENCE_RANGES; what the
    # radiograph shows explains much, not all, of the maps (no literature figure: a design choice).
    assert 0.3 < stats["map_variance_explained_by_visible"] < 0.8
    # Severe OA denudes part of the femoral outline; healthy knees keep cartilage everywhere.
    assert stats["fc_denuded_share"]["klg_4"] > 0.01
    assert stats["fc_denuded_share"]["all"] < 0.02
