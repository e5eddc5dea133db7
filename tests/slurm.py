"""A real single-node SLURM for the `slurm` tests, stood up with cluster/slurm-up.

The session fixture `slurm` starts munged, slurmctld and slurmd (installing them with apt when
missing), exports SLURM_CONF for the session and stops the daemons at the end. When SLURM cannot be
stood up here (not root, packages not installable) the tests using it are skipped with the reason,
unless MBCUBE_REQUIRE_SLURM=1 (set by .ci/run), which turns the skip into a failure. tests/conftest.py
makes the fixture available to every test file with `from tests.slurm import slurm  # noqa: F401`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / "cluster" / "slurm-up"
SLURM_DOWN = REPO / "cluster" / "slurm-down"
#: slurm-up's exit code for "cannot stand SLURM up on this machine" (a skip, not a bug).
CANNOT = 3


@dataclass(frozen=True)
class Slurm:
    """The SLURM of this test session: its slurm.conf (exported as SLURM_CONF)."""

    conf: Path

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, job name, state) of the jobs in the queue."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%j|%T"], check=True, capture_output=True, text=True
        ).stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line]  # type: ignore[misc]


# Shared by every definition of the fixture (a test module may import it besides conftest.py):
# SLURM is stood up once per process and stopped by the last user.
_state: dict[str, object] = {"users": 0, "slurm": None, "started": False, "old_conf": None}


def _up() -> Slurm:
    required = os.environ.get("MBCUBE_REQUIRE_SLURM") == "1"
    try:
        done = subprocess.run([str(SLURM_UP)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        done = subprocess.CompletedProcess([str(SLURM_UP)], CANNOT, "", f"slurm-up: {err}")
    lines = done.stderr.strip().splitlines()
    reason = lines[-1] if lines else f"slurm-up exited with {done.returncode}"
    if done.returncode == CANNOT and not required:
        pytest.skip(f"SLURM tests skipped: {reason} (MBCUBE_REQUIRE_SLURM=1 makes this a failure)")
    if done.returncode != 0:
        pytest.fail(f"cluster/slurm-up failed (exit {done.returncode}):\n{done.stderr}")
    exports = [line for line in done.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    if not exports:
        pytest.fail(f"cluster/slurm-up printed no SLURM_CONF:\n{done.stdout}\n{done.stderr}")
    conf = Path(exports[-1].split("=", 1)[1])
    _state["started"] = " started (pid " in done.stderr  # else it was running before: keep it
    _state["old_conf"] = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # for dask-jobqueue's sbatch/squeue/scancel and children
    return Slurm(conf)


def _down() -> None:
    old = _state["old_conf"]
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = str(old)
    if _state["started"]:
        subprocess.run([str(SLURM_DOWN)], capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """A running single-node SLURM (SLURM_CONF exported); skipped or failed as the module says."""
    if _state["slurm"] is None:
        _state["slurm"] = _up()
    _state["users"] = int(str(_state["users"])) + 1
    try:
        yield _state["slurm"]  # type: ignore[misc]
    finally:
        _state["users"] = int(str(_state["users"])) - 1
        if _state["users"] == 0:
            _state["slurm"] = None
            _down()
