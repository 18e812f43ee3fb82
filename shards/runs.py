"""Run folders: every command writes ``<runs root>/<command>/<name>/`` with config.yaml and metrics.json.

The runs root is ``runs`` (relative to the working directory) or ``$MSKFM_RUNS``; the config schemas
take their default run folders from :func:`runs_root`, so one variable moves every command's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .config import save_config

RUNS_ENV = "MSKFM_RUNS"


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def default_folder(command: str) -> Callable[[], str]:
    """A dataclass ``default_factory`` for a schema's run folder: ``<runs root>/<command>``."""
    return lambda: str(runs_root() / command)


def run_dir(command: str, name: str, root: str | Path | None = None) -> Path:
    path = Path(root or runs_root()) / command / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metrics(path: Path, metrics: dict, default: Callable | None = float, **dump) -> Path:
    """``<path>/metrics.json``, written atomically (a reader never sees half a file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, default=default, **dump))
    os.replace(tmp, path / "metrics.json")
    return path / "metrics.json"


def write_run(path: Path, config: Any, metrics: dict) -> None:
    """Write the resolved config and the metrics of a run (metrics atomically)."""
    save_config(config, path / "config.yaml")
    write_metrics(path, metrics)
