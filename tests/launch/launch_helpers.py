"""Running launch commands (torchrun, torchx) as subprocesses from tests, with timeouts and readable failures."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
DLRM_SCRIPT = REPO / "examples" / "dlrm" / "dlrm_main.py"
COMPONENT = REPO / "launch" / "components.py"
BIN = os.path.dirname(sys.executable)

# Set by an enclosing torchrun/torchx job; a child launcher must not inherit them.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


_ERROR_LINE = re.compile(r"(\w+Error|\w+Exception|\berror): ")


@dataclass
class Finished:
    command: List[str]
    returncode: int
    stdout: str
    stderr: str


def job_env() -> Dict[str, str]:
    """The test's environment with the venv's bin first on PATH (torchx's dist.ddp calls `torchrun` via bash)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "TORCHX_"))}
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_together(commands: Sequence[List[str]], log_dir: Path, timeout_s: float) -> List[Finished]:
    """Starts every command at once (cwd: the repository root) and waits for all of them.

    Fails the test, with the tail of each command's stderr, if one exits non-zero or the group
    runs past ``timeout_s`` (then every process group started here is terminated).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, command in enumerate(commands):
        out, err = open(log_dir / f"{i}.out", "w+"), open(log_dir / f"{i}.err", "w+")
        procs.append((command, subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=out, stderr=err,
                                                start_new_session=True), out, err))
    timed_out = False
    try:
        for _command, proc, _out, _err in procs:
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop([proc for _c, proc, _o, _e in procs])
    finished = []
    for command, proc, out, err in procs:
        out.seek(0)
        err.seek(0)
        finished.append(Finished(command, proc.returncode, out.read(), err.read()))
        out.close()
        err.close()
    if timed_out or any(f.returncode != 0 for f in finished):
        why = f"timed out after {timeout_s:.0f} s" if timed_out else "failed"
        raise AssertionError(f"launch {why}:\n" + "\n".join(_describe(f) for f in finished))
    return finished


def _stop(procs: List[subprocess.Popen]) -> None:
    """SIGTERM first (torchrun and torchx then stop their workers), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass


def _describe(f: Finished, lines: int = 40) -> str:
    # A worker's own error comes first, then pages of launcher tracebacks: show both.
    stderr = f.stderr.splitlines()
    errors = list(dict.fromkeys(line for line in stderr if _ERROR_LINE.search(line)))[:10]
    tail = "\n".join(stderr[-lines:])
    return (f"$ {' '.join(f.command)}\nexit code {f.returncode}; error lines:\n" + "\n".join(errors)
            + f"\nlast {lines} lines of stderr:\n{tail}\n")


def read_results(path: Path) -> Dict[str, Any]:
    assert path.is_file(), f"the job finished but wrote no results to {path}"
    return json.loads(path.read_text())


def torchrun_command(script_args: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: Optional[str] = None, rdzv_id: str = "lhf-test") -> List[str]:
    command = [os.path.join(BIN, "torchrun"), "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node)]
    if rdzv_endpoint:
        command += ["--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint,
                    "--rdzv_id", rdzv_id]
    else:
        command += ["--standalone"]
    return command + [str(DLRM_SCRIPT), *script_args]


def torchx_command(
    script_args: Sequence[str], *, j: str, log_dir: Path, component_args: Sequence[str] = ()
) -> List[str]:
    # The component's script path is relative: torchx runs from the repository root, as documented.
    return [os.path.join(BIN, "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
            f"{COMPONENT.relative_to(REPO)}:dlrm", "-j", j, *component_args, "--", *script_args]
