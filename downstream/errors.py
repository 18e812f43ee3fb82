"""Errors of the downstream package (kept import-light so the CLI can catch them cheaply)."""

from shards.config import UserError


class FeatureError(UserError, RuntimeError):
    """Features that cannot be used (NaN or infinite values); the message names the study."""
