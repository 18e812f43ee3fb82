"""The import rules of docs/architecture.md, checked on the source (ast, every import statement,
also those inside functions): the checker passes on the repository and catches planted back-edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "pretrain", "downstream", "cluster")
CONFIG_LOADER = "shards.config"          # the one config loader every package may import
CLI_MODULES = ("cli", "__main__")        # entry points; a library module never imports one


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[list[str], int]]:
    """(absolute modules imported, line) per import statement of ``path``; ``from a import b`` names
    ``a`` and ``a.b``, since ``b`` may be a module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [([a.name], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append(([target] + [f"{target}.{a.name}" for a in node.names], node.lineno))
    return out


def is_cli(module: str) -> bool:
    return module.rpartition(".")[2] in CLI_MODULES


def top(module: str) -> str:
    return module.split(".")[0]


def rule_broken(src: str, dst: str) -> str | None:
    """The rule an import ``src -> dst`` breaks, or None."""
    s, d = top(src), top(dst)
    if s == "shards" and d in ("pretrain", "downstream", "cluster"):
        return "shards imports neither pretrain, downstream nor cluster"
    if s == "pretrain" and d in ("downstream", "cluster"):
        return "pretrain never imports downstream or cluster"
    if s == "downstream" and d == "cluster":
        return "downstream never imports cluster"
    if s == "cluster" and d in PACKAGES and d != "cluster" and not (dst == CONFIG_LOADER or
                                                                    dst.startswith(CONFIG_LOADER + ".")):
        return f"cluster imports no other package but the config loader ({CONFIG_LOADER})"
    if src.startswith("pretrain.models") and d in ("ray", "deepspeed"):
        return "models import neither ray nor deepspeed"
    if d in PACKAGES and not is_cli(src) and is_cli(dst):
        return "no library module imports a CLI module"
    return None


def violations(root: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            src = module_name(path, root)
            for targets, line in imports_of(path, root):
                broken = [(dst, rule) for dst in targets if (rule := rule_broken(src, dst))]
                if broken:
                    dst, rule = broken[-1]
                    found.append(f"{path.relative_to(root)}:{line}: {src} -> {dst}: {rule}")
    return found


def test_repository_keeps_the_import_rules():
    assert violations(ROOT) == []


PLANTED = {
    "shards/reader.py": "from pretrain.run import train\n",
    "pretrain/loop.py": "def f():\n    from downstream.finetune import run_finetune\n",
    "pretrain/models/unet.py": "import deepspeed\n",
    "pretrain/recon/study.py": "from ..cli import main\n",
    "downstream/studies/x.py": "from . import cli\n",
    "cluster/jobs.py": "from pretrain.config import PretrainConfig\n",
}


@pytest.mark.parametrize("path, source", PLANTED.items())
def test_checker_catches_a_planted_back_edge(tmp_path, path, source):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / "__init__.py").touch()
    target.write_text(source)
    (tmp_path / "cluster" / "config.py").write_text("from shards.config import load_config\n")  # allowed
    (tmp_path / "downstream" / "cli.py").write_text("from .finetune import run\nfrom pretrain import cli\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(path), found
