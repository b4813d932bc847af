"""Errors of the export step."""


class ExportVerificationError(RuntimeError):
    """An exported graph disagrees with PyTorch by more than the tolerance."""
