"""Errors of the downstream package (kept import-light so the CLI can catch them cheaply)."""


class FeatureError(RuntimeError):
    """Features that cannot be used (NaN or infinite values); the message names the study."""
