"""Ray Tune plumbing shared by sweeps and studies: connect to Ray, run or resume a Tuner, and read
its trials back as plain rows (errors included, never raised)."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

TUNE_DIR = "tune"


@dataclass
class RayConnection:
    """``ray:`` of a sweep or study config: which Ray to join (see :func:`pretrain.launchers.ray.connect_ray`)."""

    address: Optional[str] = None     # None: $RAY_ADDRESS, else a private local Ray


def run_tuner(trainable: Callable, param_space: dict, run_dir: Path, tune_config, resources: dict[str, float],
              address: str | None = None):
    """Fit a Tuner whose experiment lives in ``<run_dir>/tune`` on the Ray at ``address``; an
    interrupted experiment there is restored (finished trials kept, unfinished and errored ones run
    again) instead of restarted."""
    from ray import tune

    from pretrain.launchers.ray import connect_ray

    connect_ray(address, log_to_driver=False)
    trainable = tune.with_resources(trainable, {k: float(v) for k, v in resources.items()})
    path = run_dir.resolve() / TUNE_DIR
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the experiment in %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(run_dir.resolve()),
                                    failure_config=tune.FailureConfig(max_failures=0), verbose=0)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    grid, interrupted = _fit(tuner)
    if interrupted:
        raise Interrupted(f"interrupted; the experiment state is saved in {path}: run the same command again "
                          f"to resume ({len(grid)} trials started so far)")
    return grid


def _fit(tuner):
    """``tuner.fit()`` and whether a SIGINT stopped it. Tune returns normally after a SIGINT; its
    handler puts back the handler it found only then, so a sentinel installed before tells."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False
    previous = signal.getsignal(signal.SIGINT)

    def sentinel(sig, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, sentinel)
    try:
        grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is sentinel
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(RuntimeError):
    """The Tune experiment stopped (SIGINT) before every trial finished."""


def trial_rows(grid) -> list[dict]:
    """One dict per trial: ``config``, last reported ``metrics``, ``error`` (str or None), ``path``."""
    rows = []
    for result in grid:
        error = None
        if result.error is not None:
            error = f"{type(result.error).__name__}: {_root_message(result.error)}"
        rows.append({"config": result.config, "metrics": dict(result.metrics or {}), "error": error,
                     "path": str(result.path)})
    return rows


def _root_message(exc: BaseException) -> str:
    """The innermost cause's message (Ray wraps trial errors in RayTaskError)."""
    while getattr(exc, "cause", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "cause", None) or exc.__cause__
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
