"""The README's quick start, run exactly as written (the block after "## Quick start"), in an empty folder.

Only ``pip install`` is not run: the tests' own environment has the package installed. The block starts a worker
and beat in the background; the test waits (bounded) until the command it pushed is completed, as the README
says, and then ends the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.procs import clean_env
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    """The first bash block of the README's Quick start section."""
    section = README.read_text().split("## Quick start", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the Quick start has a bash block"
    return match.group(1)


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    """Proves the README's first commands work for a newcomer: migrate, worker, beat, a push, and `orch-outbox list`
    shows the command completed; nothing but the block itself is run."""
    block = quick_start()
    assert "orch-outbox migrate" in block and "delay(" in block
    env = clean_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", block], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        assert shell.wait(60) == 0, log.read_text()
        pushed = re.findall(r"^[0-9a-f-]{36}$", log.read_text(), re.M)
        assert len(pushed) == 1, log.read_text()

        def completed() -> bool:
            listed = subprocess.run(
                [str(Path(sys.executable).with_name("orch-outbox")), "list", "--status", "completed"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            return pushed[0] in listed.stdout

        wait_until(completed, 60, interval=0.5, describe=lambda: f"the pushed command to complete\n{log.read_text()}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
