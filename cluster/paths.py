"""Where a submitted command's paths point: this machine, shared storage, or ``s3://``.

A job behaves like the same command run where it was submitted. When every node of the cluster
is this machine, the job simply runs in the submitting folder, so relative paths (configs, data,
run roots, storage paths, caches, hub folders) and run folders are exactly those of a local run.
On a cluster with other machines that only works for folders every node mounts at the same path
(``shared_dirs``) and for ``s3://`` URLs: :func:`check_shared` refuses anything else before
submission, naming the key (or argument) that must move.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import OmegaConf

from .config import ClusterError

# Options whose value is a YAML file the command reads (the task option also takes a task name).
CONFIG_OPTIONS = ("--config", "--space")
TASK_OPTION = "--task"
# A config value is taken for a path when its last key part ends with one of PATH_SUFFIXES or is one
# of PATH_KEYS, when it names a backbone, when it contains a '/', or (arguments) when it exists here.
PATH_SUFFIXES = ("path", "dir", "root", "source")
PATH_KEYS = ("out", "shards", "cache", "hub", "to", "data")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def local_addresses() -> set[str]:
    import psutil

    addresses = {"localhost"}
    for entries in psutil.net_if_addrs().values():
        addresses.update(e.address.split("%", 1)[0] for e in entries)
    return addresses


def on_this_machine(ips: Sequence[str], mine: set[str] | None = None) -> bool:
    """Whether every node address is a loopback or one of this machine's interface addresses."""
    mine = local_addresses() if mine is None else mine
    for ip in ips:
        try:
            if ipaddress.ip_address(ip).is_loopback:
                continue
        except ValueError:
            pass
        if ip not in mine:
            return False
    return True


def under(path: Path, folders: Sequence[str]) -> bool:
    return any(path == Path(f).expanduser().resolve() or Path(f).expanduser().resolve() in path.parents
               for f in folders)


def check_shared(command: Sequence[str], cwd: Path, shared_dirs: Sequence[str],
                 working_dir: Path | None = None) -> None:
    """Refuse, before submission, a command whose paths other nodes cannot reach.

    ``cwd`` is where relative paths (and run folders under ``runs/``) resolve; it must itself be
    on shared storage. Every path-like value of the command's configs, ``key=value`` overrides and
    arguments must be an ``s3://`` (or other URL), or lie under ``shared_dirs``.
    """
    hint = ("point it to storage every node mounts at the same path (cluster key 'shared_dirs') "
            "or to an s3:// URL")
    for origin, value in command_paths(command, cwd, working_dir):
        target = Path(value).expanduser()
        target = (target if target.is_absolute() else cwd / target).resolve()
        if not under(target, shared_dirs):
            raise ClusterError(f"{origin} = '{value}' is on this machine only ({target}) and the "
                               f"cluster has other machines: {hint}")
    if not under(cwd, shared_dirs):
        raise ClusterError(f"the submitting folder {cwd} (where relative paths and run folders under "
                           "runs/ resolve) is on this machine only and the cluster has other machines: "
                           "submit from a folder under the cluster's 'shared_dirs', with data and "
                           "checkpoints there or on s3://")


def command_paths(command: Sequence[str], cwd: Path,
                  working_dir: Path | None = None) -> Iterator[tuple[str, str]]:
    """(where it comes from, value) for every local path a command names: its arguments, its
    config files and their values, with ``key=value`` overrides replacing the files' values."""
    args, yamls, overrides = list(command[1:]), [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        option, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        takes_next = i + 1 < len(args) and not args[i + 1].startswith("-") and not OVERRIDE.match(args[i + 1])
        if option.startswith("--") and (inline or takes_next):  # a flag before key=value takes no value
            value = inline or args[i + 1]
            i += 1 if inline else 2
            yield from _option_paths(option, value, cwd, working_dir, yamls)
            continue
        if OVERRIDE.match(arg):
            key, value = arg.split("=", 1)
            overrides[key] = value
        elif not arg.startswith("-") and _is_path("", arg, cwd):
            yield f"argument '{arg}'", arg
        i += 1
    for origin, path in yamls:
        for key, value in _yaml_paths(path):
            if not any(key == k or key.startswith(f"{k}.") for k in overrides):
                yield f"key '{key}' ({origin} {path.name})", value
    yield from ((f"key '{k}'", v) for k, v in overrides.items() if _is_path(k, v))


def _option_paths(option: str, value: str, cwd: Path, working_dir: Path | None,
                  yamls: list) -> Iterator[tuple[str, str]]:
    if "://" in value:
        return
    is_yaml = option in CONFIG_OPTIONS or value.endswith((".yaml", ".yml"))
    if option == TASK_OPTION and not is_yaml:  # a task name: its YAML travels with the code
        named = (working_dir or cwd) / "configs" / "tasks" / f"{value}.yaml"
        if named.is_file():
            yamls.append((option, named))
        return
    if is_yaml or _is_path(option.lstrip("-").replace("-", "_"), value, cwd):
        yield f"option {option}", value
    path = Path(value) if Path(value).is_absolute() else cwd / value
    if is_yaml and path.is_file():
        yamls.append((option, path))


def _yaml_paths(path: Path) -> Iterator[tuple[str, str]]:
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # the command reports a broken YAML itself; only paths matter here
        raise ClusterError(f"{path}: cannot parse YAML: {exc}") from None
    for key, value in _leaves(tree, ""):
        if isinstance(value, str) and _is_path(key, value):
            yield key, value


def _leaves(tree, prefix: str):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for k, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{k}]")
    else:
        yield prefix, tree


def _is_path(key: str, value: str, cwd: Path | None = None) -> bool:
    """A local filesystem path (not a URL, not prose), by its key's name, its form, or existence."""
    if not value or "://" in value or any(c.isspace() for c in value) or value.startswith(("{", "[")):
        return False
    last = re.split(r"[.\[]", key)[-1] if key else ""
    if key and (last in PATH_KEYS or last.endswith(PATH_SUFFIXES) or key.startswith("backbones")):
        return True
    if value.startswith(("/", "./", "../", "~")) or "/" in value:
        return True
    return cwd is not None and (cwd / value).exists()
