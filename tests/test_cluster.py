"""Cluster profiles, the client they build, and faults: real LocalCluster and real SLURM (no mocks).

The `slurm` tests run on a single-node SLURM stood up by cluster/slurm-up (fixture in tests/slurm.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mbcube.cluster import (
    ClusterProfileError,
    SceneJob,
    cluster_client,
    cluster_dir,
    compute,
    compute_scenes,
    load_profile,
    scenes_in_flight,
)
from mbcube.ingest import ingest
from mbcube.store import open_cube
from mbcube.synth import generate_study

if TYPE_CHECKING:
    from tests.slurm import Slurm

REPO = Path(__file__).resolve().parents[1]
#: Seconds each task of the fault tests sleeps, so that a worker can be killed mid-computation.
DELAY_S = 0.25


def _write_profile(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- profiles


def test_shipped_profiles_validate_and_merge_into_dask_config() -> None:
    pytest.importorskip("dask_jobqueue")  # registers dask-jobqueue's own defaults
    assert cluster_dir() == REPO / "cluster"
    local, local_settings = load_profile("local")
    assert (local.kind, local.host, local.threads_per_worker) == ("local", "127.0.0.1", 1)
    assert local_settings["distributed.worker.memory.terminate"] == 0.95

    spec, settings = load_profile("slurm")
    assert (spec.kind, spec.workers, spec.security) == ("slurm", 2, "none")
    assert settings["jobqueue.slurm.scheduler-options"] == {
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:8787",
    }
    assert settings["jobqueue.slurm.log-directory"] == str(
        Path("~/.cache/mbcube/slurm-logs").expanduser()
    )
    with dask.config.set(settings):
        assert dask.config.get("jobqueue.slurm.cores") == 1
        assert dask.config.get("jobqueue.slurm.memory") == "2GiB"
        # dotted keys: the profile's leaves are set, dask-jobqueue's other defaults are kept
        assert dask.config.get("jobqueue.slurm.shebang") == "#!/usr/bin/env bash"
        assert dask.config.get("jobqueue.pbs.walltime") == "00:30:00"

    multi, multi_settings = load_profile(str(REPO / "cluster" / "slurm-multinode.yaml"))
    assert multi.adaptive is not None and multi.adaptive.maximum == 40
    assert multi.security == "config"
    assert multi_settings["distributed.comm.require-encryption"] is True


def test_scheduler_address_is_a_profile() -> None:
    spec, settings = load_profile("tcp://10.0.0.5:8786")
    assert (spec.kind, spec.address, settings) == ("address", "tcp://10.0.0.5:8786", {})


def test_unknown_profile_and_unknown_key_fail_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ClusterProfileError, match=r"'nope'.*Known profiles: local, slurm"):
        load_profile("nope")
    typo = _write_profile(tmp_path / "typo.yaml", "mbcube: {cluster: {kind: local, wrokers: 2}}")
    with pytest.raises(ClusterProfileError, match="wrokers"):
        load_profile(str(typo))
    idle = _write_profile(tmp_path / "idle.yaml", "mbcube: {cluster: {kind: slurm, workers: 0}}")
    with pytest.raises(ClusterProfileError, match="never compute"):
        load_profile(str(idle))
    monkeypatch.setenv("MBCUBE_CLUSTER_DIR", str(tmp_path))
    _write_profile(tmp_path / "mine.yaml", "mbcube: {cluster: {kind: local, workers: 3}}")
    assert load_profile("mine")[0].workers == 3
    with pytest.raises(ClusterProfileError, match="Known profiles: idle, mine, typo, threads"):
        load_profile("local")


# ---------------------------------------------------------------- work on a cluster


def _slow_block_sums(store: Path, delay_s: float) -> da.Array:
    """Per scene, the sum of finite phase_rad, one task per (scene, tile) that also sleeps
    `delay_s` (so that a worker can be killed mid-computation). Returns a (scene,) array."""

    def slow_nansum(block: np.ndarray) -> np.ndarray:
        time.sleep(delay_s)
        return np.nansum(block.astype(np.float64), axis=(1, 2), keepdims=True)

    phase = open_cube(store)["phase_rad"].data.rechunk((1, -1, 128))
    sums = phase.map_blocks(slow_nansum, chunks=(1, 1, 1), dtype=np.float64)
    return sums.sum(axis=(1, 2))


def _oracle_sums(store: Path) -> np.ndarray:
    phase = xr.open_zarr(store, chunks=None)["phase_rad"].values.astype(np.float64)
    complete = open_cube(store)["scene"].size
    return np.nansum(phase[:complete], axis=(1, 2))


@pytest.fixture(scope="module")
def local_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two single-thread workers of 1 GiB each, dashboard on a free localhost port."""
    return _write_profile(
        tmp_path_factory.mktemp("profiles") / "two.yaml",
        """\
        mbcube:
          cluster: {kind: local, workers: 2, threads-per-worker: 1, memory-limit: 1GiB,
                    dashboard-address: "127.0.0.1:0"}
        distributed:
          worker:
            memory: {target: 0.5, spill: 0.6, pause: 0.8, terminate: 0.95}
        """,
    )


_AFTER_SCRIPT = """
import sys
import dask
import dask.array as da
from mbcube.cluster import cluster_client

if __name__ == "__main__":
    with cluster_client(sys.argv[1]) as client:
        assert dask.config.get("distributed.worker.memory.target") == 0.5
        inside = da.arange(10, chunks=5).sum().compute()
    # steps after the cluster (aggregate, report) compute with dask's default scheduler
    after = da.arange(10, chunks=5).sum().compute()
    print(inside, after, dask.config.get("distributed.comm.timeouts.connect"),
          dask.config.get("distributed.worker.memory.target"))
"""


def test_leaving_the_cluster_restores_dask_config(tmp_path: Path, local_client: Any) -> None:
    """In a fresh process (distributed not yet imported), through a profile that connects to the
    running cluster and sets a distributed key: after the block, distributed's own defaults are
    still there, the profile's key is gone, and dask computes with its default scheduler."""
    profile = _write_profile(
        tmp_path / "connect.yaml",
        f"""\
        mbcube: {{cluster: {{kind: address, address: "{local_client.scheduler.address}"}}}}
        distributed: {{worker: {{memory: {{target: 0.5}}}}}}
        """,
    )
    script = tmp_path / "after.py"
    script.write_text(_AFTER_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(profile)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["45", "45", "30s", "0.6"]


@pytest.fixture(scope="module")
def local_client(local_profile: Path) -> Iterator[Any]:
    with cluster_client(str(local_profile)) as client:
        yield client


def _kill_mid_computation(client: Any, future: Any, kill: Callable[[str], None]) -> str:
    """Wait until a few tasks finished and the first worker is busy, then `kill(address)` it."""
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline:
        processing = client.processing()
        done = sum(1 for s in client.cluster.scheduler.tasks.values() if s.state == "memory")
        busy = [addr for addr, keys in processing.items() if keys]
        if done >= 2 and busy:
            victim = busy[0]
            break
        time.sleep(0.05)
    if victim is None or future.done():
        pytest.fail("could not catch the computation while it ran")
    kill(victim)
    return victim


def test_local_cluster_computes_on_the_cube_with_the_profile(
    local_client: Any, tiny_cube: Path
) -> None:
    workers = local_client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
    assert local_client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert {w["memory_limit"] for w in workers.values()} == {2**30}
    targets = local_client.run(lambda: dask.config.get("distributed.worker.memory.target"))
    assert set(targets.values()) == {0.5}  # the profile reached the worker processes

    (sums,) = compute(_slow_block_sums(tiny_cube, 0.0), label="sums")
    (same,) = dask.compute(_slow_block_sums(tiny_cube, 0.0), scheduler="sync")
    np.testing.assert_array_equal(sums, same)
    np.testing.assert_allclose(sums, _oracle_sums(tiny_cube), rtol=1e-9)
    assert np.all(np.abs(sums) > 0)


def test_connect_to_a_running_scheduler_by_address(local_client: Any, tiny_cube: Path) -> None:
    with cluster_client(local_client.scheduler.address) as other:
        assert other.scheduler.address == local_client.scheduler.address
        (sums,) = compute(_slow_block_sums(tiny_cube, 0.0), label="sums")
    np.testing.assert_allclose(sums, _oracle_sums(tiny_cube), rtol=1e-9)
    assert local_client.status == "running"  # leaving the block did not stop the cluster


def _slow_value(i: int, fail: bool) -> int:
    time.sleep(0.05 if fail else 0.6)  # a failing job fails before its neighbour finishes
    if fail:
        raise ValueError(f"job {i} fails")
    return i


def _jobs(n: int, failing: int, log: list[str]) -> list[SceneJob]:
    def job(i: int) -> SceneJob:
        def build() -> list[Any]:
            log.append(f"build {i}")
            return [dask.delayed(_slow_value)(i, i == failing)]

        def finish(values: list[Any]) -> None:
            assert values == [i]
            log.append(f"finish {i}")

        return SceneJob(f"S{i}", f"job {i}", build, finish)

    return [job(i) for i in range(n)]


def test_compute_scenes_keeps_two_scenes_in_flight_and_finishes_the_submitted_one(
    local_client: Any,
) -> None:
    """2 workers: 2 scenes in flight (both built before either finished). Job 1 fails: every
    other job that was started runs to the end and is recorded, and the error reaches the
    caller. (Which later jobs start before the failure is seen depends on timing.)"""
    assert scenes_in_flight(local_client) == 2
    log: list[str] = []
    with pytest.raises(ValueError, match="job 1 fails"):
        compute_scenes(_jobs(6, failing=1, log=log))
    assert log[:2] == ["build 0", "build 1"]
    built = {e.split()[1] for e in log if e.startswith("build")}
    finished = {e.split()[1] for e in log if e.startswith("finish")}
    assert finished == built - {"1"}, log
    assert len(built) < 6, log  # the failure stopped the submissions

    log.clear()
    assert compute_scenes(_jobs(3, failing=-1, log=log)) in (["S0", "S1", "S2"], ["S1", "S0", "S2"])


def test_compute_scenes_without_a_cluster_runs_one_scene_after_another(
    local_client: Any,
) -> None:
    log: list[str] = []
    with dask.config.set(scheduler="threads"), pytest.raises(ValueError, match="job 1 fails"):
        compute_scenes(_jobs(3, failing=1, log=log))
    # the next job is built while one computes; job 2 is built but never computed or finished
    assert log == ["build 0", "build 1", "finish 0", "build 2"]


def test_worker_sigkilled_mid_computation_does_not_change_the_result(
    local_client: Any, tiny_cube: Path
) -> None:
    pids = local_client.run(os.getpid)
    graph = _slow_block_sums(tiny_cube, DELAY_S)
    (expected,) = dask.compute(_slow_block_sums(tiny_cube, 0.0), scheduler="sync")
    future = local_client.compute(graph)
    victim = _kill_mid_computation(
        local_client, future, lambda addr: os.kill(pids[addr], signal.SIGKILL)
    )
    result = future.result(timeout=180)
    np.testing.assert_array_equal(result, expected)
    local_client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
    assert victim not in local_client.scheduler_info(n_workers=-1)["workers"]
    assert set(local_client.run(os.getpid).values()).isdisjoint({pids[victim]})


def test_tls_profile_encrypts_scheduler_workers_and_clients(tmp_path: Path) -> None:
    """`security: config` with certificate files (made here with openssl): every address is
    tls://, and a second client connects by address through a `kind: address` TLS profile."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    tls = (
        "distributed:\n  comm:\n    require-encryption: true\n    tls:\n"
        f"      ca-file: {cert}\n"
        + "".join(
            f"      {role}: {{cert: {cert}, key: {key}}}\n"
            for role in ("scheduler", "worker", "client")
        )
    )
    local = _write_profile(
        tmp_path / "tls.yaml",
        "mbcube: {cluster: {kind: local, workers: 1, memory-limit: 1GiB, security: config,\n"
        "  dashboard-address: '127.0.0.1:0'}}\n" + tls,
    )
    with cluster_client(str(local)) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        assert da.arange(10, chunks=5).sum().compute() == 45
        connect = _write_profile(
            tmp_path / "connect.yaml",
            f"mbcube: {{cluster: {{kind: address, address: '{address}', security: config}}}}\n"
            + tls,
        )
        with cluster_client(str(connect)) as other:
            assert other.submit(sum, [1, 2, 3]).result() == 6


# ---------------------------------------------------------------- on a real SLURM


def _cube_arrays(store: Path) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(store, chunks=None)
    return {str(k): ds[k].values for k in [*ds.data_vars, *ds.coords]}


def _assert_same_cube(store: Path, reference: Path) -> None:
    got, want = _cube_arrays(store), _cube_arrays(reference)
    assert sorted(got) == sorted(want)
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


@pytest.fixture(scope="module")
def slurm_client(slurm: Slurm) -> Iterator[Any]:
    """A client on 2 SLURM workers (profile `slurm`), shared by this module's SLURM tests."""
    with cluster_client("slurm") as client:
        client.wait_for_workers(2, timeout=120)
        yield client
    # leaving the block cancelled the jobs (COMPLETING: slurmd is still reaping them)
    left = [job for job in slurm.squeue() if job[1] == "mbcube-worker"]
    assert all(state in ("COMPLETING", "CANCELLED") for *_, state in left), left


def _tasks_done(client: Any) -> int:
    """Tasks the workers of `client` have executed so far (summed over the workers)."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


_INGEST_SCRIPT = """
import sys
from mbcube.cluster import quiet
from mbcube.ingest import ingest
with quiet():
    ingest(sys.argv[1], sys.argv[2], progress=lambda msg: print(msg, flush=True))
"""


@pytest.mark.slurm
def test_ingest_killed_mid_scene_resumes_on_slurm_to_the_same_cube(
    slurm_client: Any, tiny_study: Path, tiny_cube: Path, tmp_path: Path
) -> None:
    """SIGKILL of an ingest in the middle of its second scene; the rerun (on SLURM) completes it,
    and the cube equals the one ingested without interruption, array by array."""
    store = tmp_path / "cube.zarr"
    scenes = pd.read_csv(tiny_study / "scenes.csv")
    proc = subprocess.Popen(
        [sys.executable, "-c", _INGEST_SCRIPT, str(tiny_study), str(store)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    started: list[str] = []
    for line in proc.stdout:
        if line.startswith("ingesting scene"):
            started.append(line.split()[2])
        if len(started) == 2:
            # kill as soon as the second scene's first tile is on disk: in the middle of its writes
            # (its graph is built while the first scene computes; its tiles are written after)
            deadline = time.monotonic() + 60
            while not list(store.glob("phase_rad/c/1/*/*")) and time.monotonic() < deadline:
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the ingest ended before it could be killed"
    assert open_cube(store)["scene"].size == 1  # only the first scene counts as complete

    tasks_before = _tasks_done(slurm_client)
    report = ingest(tiny_study, store)  # on the SLURM workers: the default client
    assert _tasks_done(slurm_client) > tasks_before + 100
    assert report.skipped == [started[0]]
    assert sorted(report.resumed) == sorted(set(scenes.iloc[:, 0].astype(str)) - {started[0]})
    _assert_same_cube(store, tiny_cube)
    assert ingest(tiny_study, store).skipped == report.skipped + report.resumed


@pytest.mark.slurm
def test_slurm_worker_sigkill_and_scancel_mid_computation(
    slurm: Slurm, slurm_client: Any, tiny_cube: Path
) -> None:
    """Runs last on the module's SLURM cluster: it leaves one worker."""
    client = slurm_client
    (expected,) = dask.compute(_slow_block_sums(tiny_cube, 0.0), scheduler="sync")
    jobs = {name: job.job_id for name, job in client.cluster.workers.items()}
    assert {job_id for job_id, name, _ in slurm.squeue() if name == "mbcube-worker"} == set(
        jobs.values()
    )
    info = client.scheduler_info(n_workers=-1)["workers"]
    job_of = {addr: jobs[w["name"]] for addr, w in info.items()}
    pids = client.run(os.getpid)

    # 1. SIGKILL the worker process of one job: its nanny starts a new one in the same job
    future = client.compute(_slow_block_sums(tiny_cube, DELAY_S))
    killed = _kill_mid_computation(client, future, lambda addr: os.kill(pids[addr], signal.SIGKILL))
    np.testing.assert_array_equal(future.result(timeout=180), expected)
    client.wait_for_workers(2, timeout=60)
    assert killed not in client.scheduler_info(n_workers=-1)["workers"]

    # 2. scancel the job of a busy worker: the work finishes on the remaining one
    info = client.scheduler_info(n_workers=-1)["workers"]
    job_of = {addr: jobs[w["name"]] for addr, w in info.items()}
    future = client.compute(_slow_block_sums(tiny_cube, DELAY_S))
    cancelled: list[str] = []

    def scancel(addr: str) -> None:
        subprocess.run(["scancel", job_of[addr]], check=True)
        cancelled.append(job_of[addr])

    _kill_mid_computation(client, future, scancel)
    np.testing.assert_array_equal(future.result(timeout=180), expected)
    running = {job_id for job_id, _, state in slurm.squeue() if state != "COMPLETING"}
    assert cancelled[0] not in running


def _pipeline_landed() -> bool:
    names = ("mbcube.unwrap.step", "mbcube.corrections.step", "mbcube.binning", "mbcube.aggregate")
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ModuleNotFoundError:
        return False


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _pipeline_landed(), reason="pipeline steps (unwrap/correct/bin) not landed")
def test_mbcube_run_on_slurm_gives_the_local_tables(slurm: Slurm, tmp_path: Path) -> None:
    """`mbcube run --cluster slurm` and `--cluster local` on the same small study (the tiny
    preset cut to 256 px and 2 scenes): identical glacier and region tables."""
    study = generate_study(tmp_path / "study", "tiny", size_px=256, n_scenes=2, n_glaciers=8)
    mbcube = shutil.which("mbcube", path=str(Path(sys.executable).parent))
    assert mbcube is not None
    for profile in ("slurm", "local"):
        out = tmp_path / profile
        command = [mbcube, "run", str(study), "--store", str(out / "cube.zarr"), "--out", str(out)]
        subprocess.run([*command, "--cluster", profile, "--quiet"], check=True, timeout=900)
    for table in ("glaciers.csv", "regions.csv"):
        slurm_table, local_table = (pd.read_csv(tmp_path / p / table) for p in ("slurm", "local"))
        assert len(local_table) > 0
        pd.testing.assert_frame_equal(slurm_table, local_table)
