"""``cluster submit``: any platform command as a Ray job, its logs streamed, its exit status returned.

The runtime environment carries the code (the checkout, with ``configs/``; without data, runs,
caches, published backbones or the virtualenv) to the cluster; platform commands (``shards``,
``pretrain``, ``downstream``, ``cluster``) run as ``python -m <package>`` from that uploaded copy,
so a job runs the submitted code, not whatever version happens to be installed on the nodes.
The command itself runs in the submitting folder, like the same command run locally: relative
paths and run folders resolve there (see :mod:`cluster.paths` for clusters with other machines).
Nothing secret travels in the job: cloud keys and W&B/Hugging Face tokens come from the nodes'
own environment; of the submitter's environment only ``MSKFM_RUNS`` (where run folders go) does.

Exit status: Ray records the entrypoint's return code as ``driver_exit_code``; ``submit`` returns
it unchanged. A job that never ran its command (runtime env failure, stopped) returns 1.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from .config import ClusterError
from .local import check_reachable
from .paths import check_shared, on_this_machine

PLATFORM_COMMANDS = ("shards", "pretrain", "downstream", "cluster")
# Anchored at the package root (gitignore syntax): what a run reads or writes never travels.
EXCLUDES = ["/.venv", ".git", "/data", "/runs", "/cache", "/hub", "/wandb", "/docs", "__pycache__", "*.egg-info",
            ".pytest_cache", "/build", "*.tmp"]
CARRIED_ENV = ("MSKFM_RUNS",)
CHECKOUT = Path(__file__).resolve().parents[1]  # the packages and configs/ a job runs


def _url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def client(address: str, timeout: float = 5.0):
    """A JobSubmissionClient for a dashboard URL, after a quick reachability check."""
    from ray.job_submission import JobSubmissionClient

    url = _url(address)
    parsed = urlparse(url)
    if not parsed.hostname or not parsed.port:
        raise ClusterError(f"job address '{address}' must be the dashboard's http://host:port")
    check_reachable(parsed.hostname, parsed.port, timeout)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # the client's version handshake: not a Ray dashboard, or too old
        raise ClusterError(f"{url} does not answer as a Ray dashboard: {exc}") from None


def entrypoint(command: list[str]) -> str:
    if not command:
        raise ClusterError("nothing to submit: give a command after `--`, "
                           "e.g. `cluster submit -- shards info data/shards/tiny`")
    head, rest = command[0], command[1:]
    if head in PLATFORM_COMMANDS:
        return shlex.join(["python", "-m", head, *rest])
    return shlex.join(command)


def runtime_env(working_dir: str | Path) -> dict:
    folder = Path(working_dir).resolve()
    if not folder.is_dir():
        raise ClusterError(f"working dir not found: {folder}")
    # PYTHONSAFEPATH: the command runs in the submitting folder but imports the uploaded code.
    env = {"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    env.update({k: str(Path(os.environ[k]).resolve()) for k in CARRIED_ENV if os.environ.get(k)})
    return {"working_dir": str(folder), "excludes": list(EXCLUDES), "env_vars": env}


def node_addresses(address: str) -> list[str]:
    """The addresses of the cluster's live nodes (through the head's state API)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, raise_on_missing_output=False)
    return [n.node_ip for n in nodes if n.state == "ALIVE"]


def placed_command(command: Sequence[str], cwd: Path, working_dir: Path, local: bool,
                   shared_dirs: Sequence[str] = ()) -> str:
    """The entrypoint run in ``cwd``; on a cluster with other machines, refused (naming the key)
    unless every path it names is reachable from them."""
    if not local:
        check_shared(command, cwd, shared_dirs, working_dir)
    return f"cd {shlex.quote(str(cwd))} && {entrypoint(list(command))}"


def outputs_note(cwd: Path) -> str:
    runs = os.environ.get("MSKFM_RUNS")
    where = Path(runs).resolve() if runs else cwd / "runs"
    return f"outputs: relative paths resolve in {cwd}; run folders under {where}/"


def submit(address: str, command: list[str], working_dir: str | Path = CHECKOUT, wait: bool = True,
           out=None, shared_dirs: Sequence[str] = ()) -> int:
    """Submit ``command`` to run in this folder; with ``wait``, stream its logs and return its
    exit code (else 0)."""
    out = out or sys.stdout
    entrypoint(command)
    jobs = client(address)
    env = runtime_env(working_dir)
    cwd = Path.cwd().resolve()
    local = on_this_machine(node_addresses(_url(address)))
    cmd = placed_command(command, cwd, Path(env["working_dir"]), local, shared_dirs)
    note = outputs_note(cwd)
    job_id = _submit_when_ready(jobs, cmd, env, {"mskfm_cwd": str(cwd), "mskfm_outputs": note})
    print(f"submitted {job_id}: {cmd}\n{note}", file=out, flush=True)
    if not wait:
        return 0
    try:
        asyncio.run(_stream(jobs, job_id, out))
        return final_exit_code(jobs, job_id, out)
    except KeyboardInterrupt:
        jobs.stop_job(job_id)
        print(f"interrupted: stopped {job_id}", file=out, flush=True)
        return 130


def _submit_when_ready(jobs, cmd: str, env: dict, metadata: dict, wait_s: float = 60.0) -> str:
    """Submit, waiting for a freshly started head's job agent to register (Ray answers 500 until then)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jobs.submit_job(entrypoint=cmd, runtime_env=env, metadata=metadata)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise ClusterError(f"job submission failed: {exc}") from None
            time.sleep(1.0)


async def _stream(jobs, job_id: str, out) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def final_exit_code(jobs, job_id: str, out, poll_s: float = 0.5) -> int:
    while not jobs.get_job_status(job_id).is_terminal():
        time.sleep(poll_s)
    info = jobs.get_job_info(job_id)
    code = info.driver_exit_code
    if code is None:
        code = 0 if info.status.value == "SUCCEEDED" else 1
    print(f"job {job_id} {info.status.value} (exit {code})", file=out, flush=True)
    return code


def list_jobs(address: str) -> list[dict]:
    rows = []
    for job in client(address).list_jobs():
        rows.append({"id": job.submission_id or job.job_id, "status": job.status.value,
                     "exit": job.driver_exit_code, "start": _clock(job.start_time),
                     "end": _clock(job.end_time), "entrypoint": job.entrypoint,
                     "outputs": (job.metadata or {}).get("mskfm_outputs", "")})
    return sorted(rows, key=lambda r: r["start"])


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
