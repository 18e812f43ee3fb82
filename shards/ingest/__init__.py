"""Ingest of external formats into shards (fastMRI HDF5, ...)."""
