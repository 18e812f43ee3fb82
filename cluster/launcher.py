"""Cloud clusters: Ray cluster-launcher YAMLs (``configs/cluster/aws.yaml``, ``gcp.yaml``).

``cluster up --config aws.yaml`` checks the YAML first (Ray's own launcher schema, then what mskfm
needs: declared node types, the package installed from the pinned constraints, no secrets in the
file) and only then runs ``ray up``; ``cluster down --config aws.yaml`` runs ``ray down``.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import yaml

from .config import ClusterError
from .local import _ray_cli, ray_env

REQUIRED = ("cluster_name", "provider", "available_node_types", "head_node_type")
NODE_REQUIRED = ("node_config", "resources", "min_workers", "max_workers")
SECRET_KEY = re.compile(r"(secret|token|password|passwd|api_key|access_key)", re.IGNORECASE)
SECRET_ASSIGN = re.compile(r"\b([A-Z_]*(SECRET|TOKEN|PASSWORD|API_KEY)[A-Z_]*)=(?!\$)\S+")


def is_launcher_config(path: str | Path) -> bool:
    """A launcher YAML names a cloud ``provider``; a local head config does not."""
    raw = _load(path)
    return isinstance(raw, dict) and "provider" in raw


def _load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"cluster config not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ClusterError(f"{p}: cannot parse YAML: {exc}") from None


def validate_launcher_config(path: str | Path) -> dict:
    """Return the parsed YAML, or raise ClusterError naming the file and the offending key."""
    raw = _load(path)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ClusterError(f"{path}: missing key(s) {', '.join(missing)}")
    types = raw["available_node_types"]
    if not isinstance(types, dict) or not types:
        raise ClusterError(f"{path}: available_node_types must map node type names to their specs")
    if raw["head_node_type"] not in types:
        raise ClusterError(f"{path}: head_node_type '{raw['head_node_type']}' is not a node type; "
                           f"known: {', '.join(types)}")
    for name, spec in types.items():
        absent = [k for k in NODE_REQUIRED if k not in (spec or {})]
        if absent:
            raise ClusterError(f"{path}: node type '{name}' lacks {', '.join(absent)}")
    _check_install(path, raw)
    _check_no_secrets(path, raw)
    _ray_schema(path, raw)
    return raw


def _check_install(path, raw: dict) -> None:
    commands = " ".join(map(str, raw.get("setup_commands", []) + raw.get("head_setup_commands", [])))
    if "-c constraints.txt" not in commands and "--constraint constraints.txt" not in commands:
        raise ClusterError(f"{path}: setup_commands must install mskfm with the pinned versions "
                           "(`pip install -c constraints.txt ...`)")


def _check_no_secrets(path, node, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if SECRET_KEY.search(str(key)) and isinstance(value, (str, int)) and str(value).strip():
                raise ClusterError(f"{path}: key '{here}' holds a secret; take it from the "
                                   "environment or the cloud's instance role instead")
            _check_no_secrets(path, value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_no_secrets(path, value, f"{where}[{i}]")
    elif isinstance(node, str) and SECRET_ASSIGN.search(node):
        name = SECRET_ASSIGN.search(node).group(1)
        raise ClusterError(f"{path}: '{where}' sets {name} to a literal; reference ${name} from "
                           "the environment instead")


def _ray_schema(path, raw: dict) -> None:
    """Ray's launcher schema and defaults: exactly what `ray up` will apply."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except Exception as exc:  # jsonschema.ValidationError or ValueError from Ray's checks
        where = ".".join(map(str, getattr(exc, "absolute_path", []) or []))
        msg = getattr(exc, "message", None) or str(exc).splitlines()[0]
        raise ClusterError(f"{path}: {where + ': ' if where else ''}{msg}") from None


def _ray(verb: str, path: str | Path, extra: list[str]) -> int:
    cmd = _ray_cli() + [verb, "-y", str(path), *extra]
    return subprocess.call(cmd, env=ray_env(loopback=False))


def up(path: str | Path) -> int:
    validate_launcher_config(path)
    return _ray("up", path, ["--no-config-cache", "--disable-usage-stats"])


def down(path: str | Path) -> int:
    validate_launcher_config(path)
    return _ray("down", path, [])
