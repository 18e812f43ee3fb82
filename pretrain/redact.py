"""What a published backbone may say about where it was trained: no local paths, no user names.

Training configs and metrics hold the data and run folders of the machine that trained (often
``/home/<user>/...``). :func:`public` rewrites every string in a nested config: an absolute local
path (or ``file://`` URL) becomes ``<local>/<last component>``; a remote URL (``s3://``, ``hf://``,
``https://``) keeps its location but loses any ``user:password@``; the home folder and the user's
login name are replaced wherever else they appear. Relative paths (``data/shards/demo``) stay.
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

LOCAL = "<local>"
USER = "<user>"
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:[^/@]*@)?(?P<rest>.*)$")
_WINDOWS = re.compile(r"^[A-Za-z]:[\\/]")


def _identity() -> tuple[str, list[str]]:
    """(home folder, login names of this process) to be removed from published text."""
    names = {os.environ.get(k, "") for k in ("USER", "LOGNAME", "USERNAME")}
    try:
        names.add(getpass.getuser())
    except (KeyError, OSError):  # no passwd entry (containers)
        pass
    home = str(Path.home())
    names.add(Path(home).name)
    return home, sorted((n for n in names if len(n) >= 3), key=len, reverse=True)


def public_string(text: str, home: str | None = None, users: list[str] | None = None) -> str:
    """One string with local paths and user names removed (see the module docstring)."""
    if home is None or users is None:
        home, users = _identity()
    text = str(text)
    url = _URL.match(text)
    if url and url.group("scheme").lower() != "file":
        text = f"{url.group('scheme')}://{url.group('rest')}"
    else:
        path = url.group("rest") if url else text
        if path.startswith(("/", "~")) or _WINDOWS.match(path):
            name = (PureWindowsPath(path) if _WINDOWS.match(path) else PurePosixPath(path)).name
            text = f"{LOCAL}/{name}" if name else LOCAL
    if home and home not in ("/", ""):
        text = text.replace(home, f"{LOCAL}/~")
    for user in users:
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(user)}(?![A-Za-z0-9])", USER, text)
    return text


def public(value, home: str | None = None, users: list[str] | None = None):
    """A nested config (dicts, lists, scalars) with every string passed through :func:`public_string`."""
    if home is None or users is None:
        home, users = _identity()
    if isinstance(value, dict):
        return {k: public(v, home, users) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v, home, users) for v in value]
    if isinstance(value, str):
        return public_string(value, home, users)
    return value
