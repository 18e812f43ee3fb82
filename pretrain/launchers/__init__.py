"""Launchers: how the one loop (:func:`pretrain.loop.train_unit`) gets its processes.

Each launcher gives every training process a *session*: ``rank``, ``world_size``,
``latest_checkpoint()`` (a context manager yielding a local checkpoint folder or None) and
``report(metrics, staging_folder, step)`` (make a saved checkpoint durable). ``local`` and
``torchrun`` use :class:`~pretrain.launchers.local.FileSession` (checkpoints as folders under
``storage_path``); ``ray`` uses Ray Train's checkpoint reporting.
"""

from __future__ import annotations


def launch(cfg) -> dict:
    """Run every unit (plane) of ``cfg`` with its launcher; returns ``{unit: final metrics}``."""
    if cfg.launcher == "local":
        from .local import run_local

        return run_local(cfg)
    if cfg.launcher == "torchrun":
        from .torchrun import run_torchrun

        return run_torchrun(cfg)
    from .ray import run_ray

    return run_ray(cfg)
