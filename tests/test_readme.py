"""The README cannot drift from the code: every command of every ```bash block is checked.

Each command line is split like a shell would (comments, ``\\`` continuations, ``;`` and ``&&``) and
checked against the real thing: platform commands (``shards``, ``pretrain``, ``downstream``,
``cluster``, also after ``torchrun -m`` or ``cluster submit --``) must parse with their own argparse
parser, and where a command loads a config (``--config``, ``--task``, ``--space``, study kinds) the
config must exist and load with the overrides written next to it (an unknown key fails); ``make``
targets must exist in the Makefile, scripts and repository files they name must exist. A new
section needs nothing here unless it uses a program that is not in :data:`OTHER_PROGRAMS`.
The cheap commands (``downstream tasks``) are run; the long ones (``pretrain run``, ``publish``,
``finetune`` submitted to a cluster) run with tiny overrides in tests/test_cluster.py.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ("shards", "pretrain", "downstream", "cluster")
OTHER_PROGRAMS = ("make", "export", "cat", "torchrun", "python")
CHEAP = {("downstream", "tasks")}


def demo_shards() -> str:
    """The shard folder `make demo` builds (scripts/demo.sh); README commands read data from there."""
    found = re.search(r"^SHARDS=(\S+)", (ROOT / "scripts/demo.sh").read_text(), flags=re.M)
    assert found, "scripts/demo.sh no longer names its shard folder as SHARDS=..."
    return found.group(1)


def built_by_demo(what: str, path: str) -> None:
    if "://" in path or Path(path).is_absolute():
        return  # a user's own data or bucket: shown as an example
    assert Path(path) == Path(demo_shards()), f"{what} reads {path}, which `make demo` does not build"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists (comments dropped, continuations joined, split at ; and &&)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                out.append(argv) if argv else None
                argv = []
            else:
                argv.append(token)
        if argv:
            out.append(argv)
    return out


README_COMMANDS = [argv for block in bash_blocks((ROOT / "README.md").read_text()) for argv in commands(block)]


def test_readme_has_commands():
    programs = {argv[0] for argv in README_COMMANDS}
    assert set(PLATFORM) <= programs, programs


@pytest.mark.parametrize("argv", README_COMMANDS, ids=[" ".join(a)[:60] for a in README_COMMANDS])
def test_readme_command(argv, capsys):
    program = argv[0]
    assert program in PLATFORM + OTHER_PROGRAMS, f"README runs `{program}`, unknown to this test: {argv}"
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets, f"make targets {argv[1:]} not in the Makefile ({sorted(targets)})"
    elif program == "python":
        assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    elif program == "torchrun":
        assert "-m" in argv, argv
        check_platform(argv[argv.index("-m") + 1:])
    elif program in PLATFORM:
        check_platform(argv)
        if tuple(argv[:2]) in CHEAP:
            run(argv)


def parse(argv: list[str]):
    import cluster.cli
    import downstream.cli
    import pretrain.cli
    import shards.cli

    parser = {"shards": shards.cli.build_parser, "pretrain": pretrain.cli.build_parser,
              "downstream": downstream.cli.build_parser, "cluster": cluster.cli._parser}[argv[0]]()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def check_platform(argv: list[str]) -> None:
    tail: list[str] = []
    if argv[0] == "cluster" and "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args = parse(argv)
    for name in ("config", "space"):
        value = getattr(args, name, None)
        if value and "://" not in value:
            assert (ROOT / value).is_file(), f"`{shlex.join(argv)}`: {value} does not exist"
    check_config(argv[0], args)
    if tail:
        check_platform(tail)


def check_config(program: str, args) -> None:
    """Load the config the command would load, with the README's overrides (unknown key = error)."""
    from shards.config import load_config

    overrides = list(getattr(args, "overrides", None) or [])
    command = getattr(args, "command", None)
    if (program, command) == ("pretrain", "run"):
        from pretrain.config import PretrainConfig

        cfg = load_config(PretrainConfig, ROOT / args.config, overrides)
        built_by_demo(f"pretrain run --config {args.config}", cfg.data.source)
    elif (program, command) == ("shards", "build"):
        from shards.build import BuildConfig

        load_config(BuildConfig, ROOT / (args.config or "configs/shards/demo.yaml"), overrides)
    elif (program, command) == ("downstream", "finetune"):
        from downstream.finetune import resolve_task

        built_by_demo(f"downstream finetune --task {args.task}", resolve_task(args.task, overrides).shards)
    elif (program, command) == ("downstream", "sweep"):
        from downstream.finetune import resolve_task
        from downstream.sweep import load_sweep

        cfg = load_sweep(ROOT / args.space, args.task, overrides)
        cfg.scheduler.rungs(resolve_task(args.task, cfg.overrides).train.epochs)
    elif (program, command) == ("downstream", "study"):
        from downstream.studies.config import load_study

        load_study(args.kind, args.space, overrides, quick=getattr(args, "quick", False))
    elif (program, command) in (("shards", "verify"), ("shards", "info")):
        built_by_demo(f"shards {command}", args.shards)
    elif (program, command) == ("cluster", "up") and args.config:
        from cluster.launcher import is_launcher_config, validate_launcher_config

        assert is_launcher_config(ROOT / args.config)
        validate_launcher_config(ROOT / args.config)


def run(argv: list[str]) -> None:
    import importlib

    main = importlib.import_module(f"{argv[0]}.cli").main
    assert main(argv[1:]) == 0, f"`{shlex.join(argv)}` failed"
