"""The Ray cluster's lifecycle: a local head, joining one, cloud launcher YAMLs, submitting jobs.

Imports Ray (and its own dependencies) only: never ``shards``, ``pretrain`` or ``downstream``,
so that a machine that only joins a cluster needs nothing else.
"""
