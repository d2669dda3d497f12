"""Synthea-shaped synthetic hospitals in pure Python: `generate(exp)` writes each site's FHIR data."""

from fedlab.synthea.generate import generate

__all__ = ["generate"]
