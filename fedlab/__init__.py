"""fedlab: FHIR interoperability + federated learning, reproducible on one machine."""

__version__ = "0.1.0"
