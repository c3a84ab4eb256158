"""De-identified export for retraining (``specgate export``): held, rejected and approved studies of the
ledger, their images and specgate SEG de-identified by the DICOM Basic Application Level Confidentiality
Profile (PS3.15 Annex E, :mod:`export.confidentiality`), NIfTI volumes and labels in the layout
``specgate model train`` and ``fit-ood`` read, a manifest, and an audit row (:mod:`export.writer`).
Which studies: :mod:`export.selection`."""

from .confidentiality import Profile, Pseudonyms
from .selection import KINDS, Criteria
from .writer import ExportError, ExportSummary, run_export

__all__ = ["KINDS", "Criteria", "ExportError", "ExportSummary", "Profile", "Pseudonyms", "run_export"]
