"""Typed config of a local head (``configs/cluster/local.yaml``), loaded like every mskfm config.

A YAML plus ``key=value`` overrides merged onto a dataclass schema by the one config loader of every
package (``shards.config``, which imports only OmegaConf; ``cluster`` imports nothing else of mskfm):
an unknown key or a wrong type is a ``ConfigError`` naming the key, a bad value a :class:`ClusterError`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from shards.config import UserError, load_config


class ClusterError(UserError, RuntimeError):
    """A cluster problem the user can fix; the CLI prints it and exits non-zero."""


@dataclass
class LocalClusterConfig:
    name: str = "local"                 # state is kept under <state_dir>/<name>/
    host: str = "127.0.0.1"             # interface GCS and raylet bind; loopback = this machine only
    port: int = 0                       # GCS port; 0 picks a free one
    dashboard: bool = True              # the Jobs API (`cluster submit`) is served by the dashboard
    dashboard_host: str = "127.0.0.1"   # never beyond loopback unless named here
    dashboard_port: int = 0             # 0 picks a free one
    num_cpus: Optional[int] = None      # None: what Ray detects
    num_gpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = None
    auth: str = "token"                 # Ray token authentication: "token" or "disabled"
    state_dir: str = "~/.mskfm/cluster"
    start_timeout_s: float = 120.0
    # Folders every node mounts at the same path: on a cluster with other machines, `submit`
    # accepts local paths only under these (or s3:// URLs). Unused when all nodes are this machine.
    shared_dirs: List[str] = field(default_factory=list)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ClusterError(f"key 'name': '{self.name}' may hold letters, digits, '_', '.', '-' only")
        for key in ("host", "dashboard_host"):
            try:
                ipaddress.ip_address(getattr(self, key))
            except ValueError:
                raise ClusterError(f"key '{key}': '{getattr(self, key)}' is not an IP address "
                                   "(name the interface's address, e.g. 10.0.0.5)") from None
        for key in ("port", "dashboard_port"):
            if not 0 <= getattr(self, key) < 65536:
                raise ClusterError(f"key '{key}': {getattr(self, key)} is not a port number")
        if self.auth not in ("token", "disabled"):
            raise ClusterError(f"key 'auth': '{self.auth}' is not one of token, disabled")
        if self.start_timeout_s <= 0:
            raise ClusterError("key 'start_timeout_s': must be positive")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() / self.name


def load_local_config(path: str | Path | None, overrides: Sequence[str] = ()) -> LocalClusterConfig:
    """Defaults <- YAML ``path`` <- ``key=value`` overrides, validated before anything starts."""
    return load_config(LocalClusterConfig, path, overrides)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
