"""MRIS: retrieval-based synthesis of MR cartilage thickness maps from knee radiographs.

The domain core lives here (DICOM reading, knee ROIs, thickness maps, the manifest, the
synthetic cohort, the CLI); ``mris.training``, ``mris.index`` and ``mris.service`` are installed
from the top-level folders ``training/``, ``index/`` and ``service/``.
"""

__version__ = "0.1.0"
