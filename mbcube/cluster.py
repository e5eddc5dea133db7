"""Where dask work runs: cluster profiles, the client, and computing with a progress bar.

`distributed` and `dask_jobqueue` are imported only in this module.
"""

from __future__ import annotations

import contextvars
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mbcube.config import read_yaml
from mbcube.errors import StudyError

#: When True, `compute` shows no progress bar (scripts, `--quiet`).
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("mbcube_quiet", default=False)
#: Scenes a step computes at once on a cluster (None: see `scenes_in_flight`).
_IN_FLIGHT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "mbcube_scenes_in_flight", default=None
)


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Inside the block, `compute` draws no progress bar."""
    token = _QUIET.set(enabled)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _active_client() -> Any | None:
    """The default distributed client, unless dask.config's `scheduler` names another one (as
    `dask.compute` does: `dask.config.set(scheduler="threads")` computes in threads)."""
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    if "distributed" not in sys.modules:  # no client can exist; importing it costs ~0.6 s
        return None
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(*collections: Any, label: str) -> tuple[Any, ...]:
    """`dask.compute(*collections)` in the active scheduler, with a progress bar of tasks done /
    total labelled `label` (e.g. 'unwrap scene T1'), unless `quiet()` is active.

    With a distributed client the bar is distributed's and the dashboard link is printed once."""
    client = _active_client()
    if _QUIET.get():
        return dask.compute(*collections)
    if client is None:
        from dask.diagnostics import ProgressBar

        print(label, flush=True)
        with ProgressBar(minimum=1.0, dt=0.5):
            return dask.compute(*collections)
    from distributed import progress

    print(f"{label} (dashboard: {client.dashboard_link})", flush=True)
    futures = client.compute(list(collections))
    progress(futures)
    return tuple(client.gather(futures))


@dataclass(frozen=True)
class SceneJob:
    """One scene's work in a step: `build()` returns its lazy writes (dask collections, e.g.
    delayed writes and small reductions), built when the job starts; `finish(results)` runs in
    this process with their computed values, in order, once they are all done (it records the
    step for the scene, so a scene is recorded only after its last byte is on disk)."""

    scene_id: str
    label: str  # progress text, e.g. 'bin scene T1'
    build: Callable[[], Sequence[Any]]
    finish: Callable[[list[Any]], None]


def scenes_in_flight(client: Any) -> int:
    """How many scenes a step keeps submitted at once on `client`'s cluster: the profile's
    `scenes-in-flight`, else 2 (the next scene's graph is built and queued while one computes,
    so workers do not idle between scenes), or one per 4 worker threads on larger clusters (a
    scene of a few tiles cannot keep many workers busy on its own)."""
    configured = _IN_FLIGHT.get()
    if configured is not None:
        return configured
    threads = sum(client.nthreads().values())
    return max(2, math.ceil(threads / 4))


def compute_scenes(jobs: Iterable[SceneJob]) -> list[str]:
    """Run the jobs; return the scene ids of those finished, in the order they finished.

    Without a distributed client: one after another, each with `compute` (progress bar), the next
    job's graph built while the previous one computes. With one: up to `scenes_in_flight` jobs
    submitted at once, each finished as soon as its writes are done. `build` and `finish` always
    run in this thread, one at a time (they write the store's metadata and state). If a job fails, the jobs already submitted still run to the end and are finished (their
    results are complete and recorded), none is started after it, and the first error is raised."""
    client = _active_client()
    finished: list[str] = []
    if client is None:
        return _compute_scenes_in_turn(jobs)
    from distributed import as_completed

    limit = scenes_in_flight(client)
    pending = iter(jobs)
    running: dict[Any, SceneJob] = {}  # future of a job's values -> the job
    queue = as_completed()

    def submit() -> None:
        """Start the next job with something to compute (a job without any is finished here)."""
        while (job := next(pending, None)) is not None:
            collections = list(job.build())
            if not collections:
                job.finish([])
                finished.append(job.scene_id)
                continue
            if not _QUIET.get():
                print(f"{job.label} (dashboard: {client.dashboard_link})", flush=True)
            # one future for the list of their values (small ones: writes and reductions)
            future = client.compute(dask.delayed(collections))
            running[future] = job
            queue.add(future)
            return

    for _ in range(limit):
        submit()
    error: BaseException | None = None
    for future in queue:
        job = running.pop(future)
        try:
            values = future.result()
        except Exception as err:  # keep the first; let the submitted ones finish
            error = error or err
            continue
        job.finish(list(values))
        finished.append(job.scene_id)
        if error is None:
            submit()
    if error is not None:
        raise error
    return finished


def _compute_scenes_in_turn(jobs: Iterable[SceneJob]) -> list[str]:
    """One compute at a time, in a helper thread, so that this thread builds the next job's
    graph meanwhile (serial Python work that would otherwise leave the threads idle)."""
    finished: list[str] = []
    running: tuple[SceneJob, Future[tuple[Any, ...]]] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbcube-compute") as pool:
        for job in jobs:
            collections = list(job.build())
            if running is not None:
                previous, future = running
                previous.finish(list(future.result()))
                finished.append(previous.scene_id)
            context = contextvars.copy_context()  # keeps quiet() for the helper thread
            running = job, pool.submit(context.run, compute, *collections, label=job.label)
        if running is not None:
            last, future = running
            last.finish(list(future.result()))
            finished.append(last.scene_id)
    return finished


# ---------------------------------------------------------------- cluster profiles

#: A scheduler address (`tcp://host:8786`, `tls://...`): connect to it instead of starting a cluster.
_ADDRESS = re.compile(r"^[a-z][a-z0-9+]*://\S+$")


class ClusterProfileError(StudyError):
    """A cluster profile that does not exist or does not validate (the message names the key)."""


class Adaptive(BaseModel):
    """Adaptive scaling bounds (worker processes)."""

    model_config = ConfigDict(extra="forbid")

    minimum: int = Field(0, ge=0)
    maximum: int = Field(ge=1)


class ClusterSpec(BaseModel):
    """The `mbcube.cluster` section of a profile (hyphens and underscores both accepted).

    kind: 'local' (dask LocalCluster on this machine: quick, no queue), 'slurm' (dask-jobqueue
    SLURMCluster: workers are SLURM jobs, scheduler in this process), 'address' (connect to a
    running scheduler at `address`; nothing is started or stopped)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "slurm", "address"] = "local"
    workers: int | None = Field(None, ge=0, description="worker processes; None: one per core")
    adaptive: Adaptive | None = None
    threads_per_worker: int = Field(1, ge=1, description="local: threads per worker process")
    memory_limit: str | float | None = Field("auto", description="local: per worker")
    host: str = Field("127.0.0.1", description="local: scheduler and workers bind here")
    dashboard_address: str | None = "127.0.0.1:8787"
    address: str | None = Field(None, description="address: the scheduler to connect to")
    wait_for_workers: int = Field(1, ge=0, description="block until this many workers joined")
    timeout_s: float = Field(300.0, gt=0, description="... or fail after this long (s)")
    security: Literal["none", "config", "temporary"] = "none"
    scenes_in_flight: int | None = Field(
        None, ge=1, description="scenes a step computes at once; None: 2, or threads / 4"
    )


def cluster_dir() -> Path:
    """The folder of named profiles: env MBCUBE_CLUSTER_DIR, else the repository's `cluster/`
    (found from this package's location), else `./cluster`."""
    env = os.environ.get("MBCUBE_CLUSTER_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1] / "cluster"
    return repo if repo.is_dir() else Path.cwd() / "cluster"


def available_profiles() -> list[str]:
    """Names of the profiles in `cluster_dir()` (plus 'threads', which runs without a cluster)."""
    folder = cluster_dir()
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return [*names, "threads"]


def _expand(value: Any) -> Any:
    """`~` and `$VARS` expanded in every string of a profile."""
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested profile -> dotted dask.config keys (so that setting one leaf keeps its siblings);
    `scheduler-options` stays a dict (it is one value: keyword arguments of the Scheduler)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key.replace("_", "-") != "scheduler-options":
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def load_profile(profile: str) -> tuple[ClusterSpec, dict[str, Any]]:
    """A profile's `mbcube.cluster` section, validated, and the dask.config keys (dotted) of the
    rest. `profile`: a scheduler address ('tcp://host:8786'), a YAML file path, or the name of a
    file in `cluster_dir()` ('local', 'slurm')."""
    if _ADDRESS.match(profile):
        return ClusterSpec(kind="address", address=profile), {}
    path = Path(profile).expanduser()
    if not (path.suffix in (".yaml", ".yml") or os.sep in profile):
        path = cluster_dir() / f"{profile}.yaml"
    if not path.is_file():
        raise ClusterProfileError(
            f"cluster profile '{profile}': no file {path}. Known profiles: "
            f"{', '.join(available_profiles())}; or pass a YAML file, or a scheduler address "
            "like tcp://host:8786 (the profile folder is env MBCUBE_CLUSTER_DIR, else cluster/)."
        )
    try:
        raw = read_yaml(path) or {}
    except StudyError as err:
        raise ClusterProfileError(f"cluster profile {err}") from err
    if not isinstance(raw, dict):
        raise ClusterProfileError(f"cluster profile {path}: expected a mapping at the top level")
    raw = _expand(raw)
    section = (raw.pop("mbcube", None) or {}).get("cluster") or {}
    try:
        spec = ClusterSpec.model_validate({k.replace("-", "_"): v for k, v in section.items()})
    except ValidationError as err:
        raise ClusterProfileError(f"cluster profile {path}, mbcube.cluster: {err}") from err
    if spec.kind == "address" and not spec.address:
        raise ClusterProfileError(f"cluster profile {path}: kind 'address' needs `address`")
    if spec.kind != "address" and spec.workers == 0 and spec.adaptive is None:
        raise ClusterProfileError(
            f"cluster profile {path}: `workers: 0` without `adaptive` would never compute"
        )
    return spec, _flatten(raw)


def _security(spec: ClusterSpec) -> Any:
    from distributed.security import Security

    if spec.security == "temporary":
        try:
            return Security.temporary()
        except ImportError as err:
            raise ClusterProfileError(
                "security: temporary needs the `cryptography` package; install it, or give "
                "certificate files (security: config, distributed.comm.tls.*)"
            ) from err
    if spec.security == "config" or (spec.address or "").startswith("tls://"):
        return Security()  # the distributed.comm.tls.* files of the (merged) config
    return None


@contextmanager
def cluster_client(profile: str) -> Iterator[Any]:
    """A `distributed.Client` on the cluster of `profile`, closed (with its cluster) on exit.

    `profile`: a name of cluster/*.yaml ('local', 'slurm'), a path to such a YAML file, or the
    address of a running scheduler ('tcp://host:8786', 'tls://...'). The profile's keys are merged
    into dask.config for the duration; `mbcube.cluster` (see `ClusterSpec`) says what to start.
    Inside the block the client is the default one, so `compute` and `dask.compute` run on it."""
    spec, settings = load_profile(profile)
    # distributed's and dask-jobqueue's defaults enter dask.config when they are imported: import
    # them before the profile's keys are set, else leaving `dask.config.set` would delete them.
    from distributed import Client

    if spec.kind == "slurm":
        import dask_jobqueue  # noqa: F401
    with dask.config.set(settings), ExitStack() as stack:
        security = _security(spec)
        if spec.kind == "address":
            client = stack.enter_context(Client(spec.address, security=security))
        else:
            cluster = stack.enter_context(_start_cluster(spec, security))
            client = stack.enter_context(Client(cluster, security=security))
            if spec.adaptive is not None:
                cluster.adapt(minimum=spec.adaptive.minimum, maximum=spec.adaptive.maximum)
            elif spec.kind == "slurm":
                cluster.scale(spec.workers if spec.workers is not None else 1)
            wanted = spec.wait_for_workers
            if spec.adaptive is not None:  # adaptive starts workers only for work to do
                wanted = min(wanted, spec.adaptive.minimum)
            if spec.kind == "slurm" and wanted:
                _wait_for_workers(client, cluster, wanted, spec.timeout_s)
        token = _IN_FLIGHT.set(spec.scenes_in_flight)
        try:
            yield client
        finally:
            _IN_FLIGHT.reset(token)


def _start_cluster(spec: ClusterSpec, security: Any) -> Any:
    """A LocalCluster or SLURMCluster (a context manager) as the spec says."""
    if spec.kind == "local":
        from distributed import LocalCluster

        n_workers = spec.workers
        if n_workers is None:
            n_workers = max(1, (os.cpu_count() or 1) // spec.threads_per_worker)
        if spec.adaptive is not None:
            n_workers = spec.adaptive.minimum
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=spec.memory_limit,
            host=spec.host,
            dashboard_address=spec.dashboard_address,
            protocol="tls://" if security is not None else None,
            security=security,
        )
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:  # pragma: no cover - dask-jobqueue is a dependency
        raise ClusterProfileError("the slurm profile needs the dask-jobqueue package") from err
    if shutil.which("sbatch") is None:
        raise ClusterProfileError(
            "the slurm profile needs SLURM's sbatch/squeue/scancel on PATH (and SLURM_CONF "
            'pointing at the cluster\'s slurm.conf; for a test cluster: eval "$(cluster/slurm-up)")'
        )
    return SLURMCluster(security=security)


def _wait_for_workers(client: Any, cluster: Any, n: int, timeout_s: float) -> None:
    try:
        client.wait_for_workers(n, timeout=timeout_s)
    except TimeoutError as err:
        raise ClusterProfileError(
            f"only {len(client.scheduler_info(n_workers=-1)['workers'])} of {n} SLURM worker(s) "
            f"joined within {timeout_s:.0f} s (jobs still queued or failing: see squeue and the "
            f"job logs in {dask.config.get('jobqueue.slurm.log-directory')}). Job script:\n"
            f"{cluster.job_script()}"
        ) from err
