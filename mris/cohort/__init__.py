"""Synthetic OAI-like cohort: one latent description per subject feeds both the thickness maps
and the bilateral PA radiograph DICOMs (see docs/COHORT.md).

Modules: ``latent`` (subjects, knees, KL grade, progression), ``maps`` (FC/TC thickness in atlas
space), ``radiograph`` (rendering), ``dicom_writer`` (tags, transfer syntaxes), ``stats``
(realism figures), ``generate`` (orchestration, files, manifest), ``preview``, ``commands`` (CLI).
"""

from mris.cohort.generate import CohortConfig, generate_cohort

__all__ = ["CohortConfig", "generate_cohort"]
