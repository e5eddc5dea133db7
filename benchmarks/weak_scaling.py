"""Weak scaling (1 vs 2 workers, same work per worker) and an out-of-core run with peak RSS.

Weak scaling: a synthetic study with SCENES_PER_WORKER x N scenes is run step by step (ingest,
unwrap, correct, bin) on a cluster of N single-thread workers (profile `local`, or `slurm` with
--cluster slurm); each step's wall time, its per-tile cost (wall x workers / tiles) and the weak
scaling efficiency T(1) / T(N) are reported. A step that fails is reported with its error and the
later steps are not run.

Out-of-core: one generated scene hard-linked under many scene ids (as ingest_throughput.py does) so
that the decoded input exceeds the machine's RAM; it is ingested on 2 workers with a memory limit,
and each worker's peak RSS (VmHWM, read from the worker at the end) is recorded.

    .venv/bin/python -m benchmarks.weak_scaling weak --size 768 --tile 256 --scenes-per-worker 2
    .venv/bin/python -m benchmarks.weak_scaling out-of-core --size 6000 --scenes 100
Results are appended to benchmarks/RESULTS-scaling.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbcube.cluster import cluster_client, quiet
from mbcube.ingest import ingest
from mbcube.synth import generate_study

RESULTS = Path(__file__).with_name("RESULTS-scaling.md")
WORK = Path(__file__).with_name("work")


def _profile(folder: Path, kind: str, workers: int, memory: str) -> Path:
    """A profile file: `workers` single-thread workers with `memory` each."""
    path = folder / f"{kind}-{workers}.yaml"
    if kind == "local":
        body = (
            f"mbcube:\n  cluster: {{kind: local, workers: {workers}, threads-per-worker: 1,\n"
            f"    memory-limit: {memory}, dashboard-address: '127.0.0.1:0'}}\n"
        )
    else:
        body = (
            f"mbcube:\n  cluster: {{kind: slurm, workers: {workers}, wait-for-workers: {workers}}}\n"
            f"jobqueue:\n  slurm: {{cores: 1, processes: 1, memory: {memory}}}\n"
        )
    path.write_text(body)
    return path


def _steps() -> list[tuple[str, Callable[..., Any]]]:
    from mbcube.binning import bin_cube
    from mbcube.corrections.step import correct_cube
    from mbcube.unwrap.step import unwrap_cube

    return [("unwrap", unwrap_cube), ("correct", correct_cube), ("bin", bin_cube)]


def _peak_rss_mib(client: Any) -> dict[str, float]:
    """Peak RSS (MiB) of every worker process since it started: VmHWM of /proc/self/status.
    (Not getrusage's ru_maxrss: it survives exec, so a spawned worker would report the RSS of
    the process it was forked from.)"""

    def peak() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    return {addr: round(v, 0) for addr, v in client.run(peak).items()}


def _cpu_s(client: Any) -> float:
    """CPU seconds (user + system, with waited-for children such as snaphu) used so far by the
    worker processes and this process."""

    def cpu() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return float(t.user + t.system + t.children_user + t.children_system)

    return sum(client.run(cpu).values()) + cpu()


def weak(args: argparse.Namespace) -> None:
    rows = []
    for workers in args.workers:
        n_scenes = args.scenes_per_worker * workers
        root = Path(tempfile.mkdtemp(prefix=f"weak{workers}-", dir=WORK))
        study = generate_study(
            root / "study",
            "tiny",
            size_px=args.size,
            tile_px=args.tile,
            n_glaciers=max(4, args.size // 40),
            n_scenes=n_scenes,
            other_crs=None,
            seed=7,
        )
        store = root / "cube.zarr"
        tiles = (-(-args.size // args.tile)) ** 2
        times: dict[str, float] = {}
        cpu: dict[str, float] = {}
        error = ""
        profile = _profile(root, args.cluster, workers, args.memory)
        with cluster_client(str(profile)) as client, quiet():
            client.wait_for_workers(workers, timeout=300)
            try:
                for name, step in [("ingest", None), *_steps()]:
                    start, cpu_start = time.perf_counter(), _cpu_s(client)
                    if step is None:
                        ingest(study, store)
                    else:
                        step(store)
                    times[name] = time.perf_counter() - start
                    cpu[name] = _cpu_s(client) - cpu_start
            except Exception as err:  # reported, not hidden: the row says which step failed
                error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                traceback.print_exc()
            rss = _peak_rss_mib(client)
        rows.append((workers, n_scenes, tiles, times, cpu, error, max(rss.values())))
        print(workers, n_scenes, times, cpu, error, rss, flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    base = {step: t for step, t in rows[0][3].items()}
    lines = [
        f"\n### Weak scaling {dt.date.today()} ({args.cluster}, {args.size}^2 px, tile "
        f"{args.tile}, {args.scenes_per_worker} scenes per worker, load avg "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n",
        "| workers | scenes | step | wall (s) | wall x workers per tile (s) | CPU per tile (s) "
        "| efficiency T1/TN |",
        "|---|---|---|---|---|---|---|",
    ]
    for workers, n_scenes, tiles, times, cpu, error, _ in rows:
        for step, wall in times.items():
            per_tile = wall * workers / (tiles * n_scenes)
            cpu_tile = cpu[step] / (tiles * n_scenes)
            eff = base[step] / wall if step in base else float("nan")
            lines.append(
                f"| {workers} | {n_scenes} | {step} | {wall:.1f} | {per_tile:.2f} | {cpu_tile:.2f} "
                f"| {eff:.2f} |"
            )
        if error:
            lines.append(f"| {workers} | {n_scenes} | (failed) | {error} | | | |")
    lines.append(
        "\nPeak worker RSS (MiB): "
        + ", ".join(f"{w} worker(s): {rss:.0f}" for w, *_, rss in rows)
        + "\n"
    )
    with RESULTS.open("a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def out_of_core(args: argparse.Namespace) -> None:
    from benchmarks.ingest_throughput import decoded_bytes, make_study

    root = WORK / f"ooc-{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    study = make_study(root, args.size, args.scenes)
    input_gb = decoded_bytes(study) / 1e9
    store = root / "cube.zarr"
    shutil.rmtree(store, ignore_errors=True)
    profile = _profile(root, args.cluster, 2, args.memory)
    with cluster_client(str(profile)) as client, quiet():
        client.wait_for_workers(2, timeout=300)
        start = time.perf_counter()
        ingest(study, store)
        wall = time.perf_counter() - start
        rss = _peak_rss_mib(client)
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    line = (
        f"\n### Out-of-core ingest {dt.date.today()}\n\n"
        f"{args.size}^2 px x {args.scenes} scenes: {input_gb:.1f} GB of decoded input rasters on a "
        f"{ram_gb:.1f} GB machine; 2 workers ({args.cluster}, memory limit {args.memory} each): "
        f"wall {wall:.0f} s ({input_gb * 1e3 / wall:.0f} MB/s); peak RSS per worker "
        f"{', '.join(f'{v:.0f}' for v in rss.values())} MiB (VmHWM). Input scenes are hard links "
        "of one generated scene (the page cache holds it; every scene is still read, decoded and "
        "written).\n"
    )
    with RESULTS.open("a") as f:
        f.write(line)
    print(line)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("weak")
    w.add_argument("--size", type=int, default=768)
    w.add_argument("--tile", type=int, default=256)
    w.add_argument("--scenes-per-worker", type=int, default=2)
    w.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    o = sub.add_parser("out-of-core")
    o.add_argument("--size", type=int, default=6000)
    o.add_argument("--scenes", type=int, default=100)
    for p in (w, o):
        p.add_argument("--cluster", choices=["local", "slurm"], default="local")
        p.add_argument("--memory", default="2GiB", help="per worker")
        p.add_argument("--keep", action="store_true", help="keep the study and cube")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    (weak if args.mode == "weak" else out_of_core)(args)


if __name__ == "__main__":
    main()
