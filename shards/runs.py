"""Run folders: every command writes ``runs/<command>/<name>/`` with config.yaml and metrics.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import save_config


def run_dir(command: str, name: str, root: str | Path | None = None) -> Path:
    root = Path(root or os.environ.get("MSKFM_RUNS", "runs"))
    path = root / command / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run(path: Path, config: Any, metrics: dict) -> None:
    """Write the resolved config and the metrics of a run (metrics atomically)."""
    save_config(config, path / "config.yaml")
    tmp = path / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, default=float))
    os.replace(tmp, path / "metrics.json")
