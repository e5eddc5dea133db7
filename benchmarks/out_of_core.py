"""The whole pipeline (`mbcube run`) on a study whose decoded input exceeds the machine's RAM.

One DEM-kind scene is generated on a SIZE x SIZE grid (30 m, tiles of TILE px) and hard-linked
under SCENES scene ids and dates, so the study holds SCENES full scenes (every one is read,
decoded, warped, corrected, binned and written like any other; the page cache can hold the one
input file, but not the cube, which is SCENES times larger). `mbcube.pipeline.run` then runs
ingest, correct, bin, aggregate and report on a local cluster of 2 single-thread workers with a
memory limit each, exactly as `mbcube run --cluster PROFILE` would.

Recorded per step: wall time, pixels per second, and each worker's peak RSS during that step
(VmHWM, reset at the start of every step through /proc/self/clear_refs), plus the cube's size on
disk, the input's decoded size, and the machine's RAM. Appended to benchmarks/RESULTS-scaling.md.

    .venv/bin/python -m benchmarks.out_of_core --size 8192 --scenes 100      # 26.8 GB of input
    .venv/bin/python -m benchmarks.out_of_core --size 1024 --scenes 4        # a quick check

The study is kept in benchmarks/work/ooc-run-SIZE/ (reused on the next run); the cube is deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import rasterio

from mbcube.cluster import cluster_client, quiet
from mbcube.pipeline import load_pipeline, run
from mbcube.synth import generate_study

RESULTS = Path(__file__).with_name("RESULTS-scaling.md")
WORK = Path(__file__).with_name("work")
STEP_LINE = re.compile(r"^\[(\w+)\] (\.\.\.|.*\((\d+\.\d) s\))$")


def make_study(root: Path, size_px: int, tile_px: int, n_scenes: int) -> Path:
    """A DEM-kind study of `n_scenes` scenes on a size_px^2 grid (scene files hard-linked)."""
    study = root / "study"
    if not (study / "scenes.csv").exists():
        generate_study(
            study,
            "large",
            size_px=size_px,
            tile_px=tile_px,
            n_glaciers=max(12, size_px // 8),
            n_scenes=1,
            kind="dem",
            other_crs=None,
        )
        shutil.copy(study / "scenes.csv", study / "scenes.one.csv")
    with open(study / "scenes.one.csv") as f:
        first = next(csv.DictReader(f))
    rows = []
    for i in range(n_scenes):
        row = dict(first)
        # winter months only, so that every scene has a seasonal value
        date = dt.date(2011 + i // 4, (10, 12, 1, 3)[i % 4], 1 + i % 28)
        row["scene_id"], row["date"] = f"D{i:03d}", date.isoformat()
        for key, value in first.items():
            if value.endswith(".tif") and key != "scene_id":
                src = study / value
                dst = src.with_name(f"D{i:03d}_{key}.tif")
                if i > 0 and not dst.exists():
                    os.link(src, dst)
                if i > 0:
                    row[key] = str(dst.relative_to(study))
        rows.append(row)
    with open(study / "scenes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(first))
        writer.writeheader()
        writer.writerows(rows)
    return study


def scene_input_bytes(study: Path) -> int:
    """Decoded bytes of the scene rasters listed in scenes.csv (width x height x itemsize x bands)."""
    total = 0
    with open(study / "scenes.csv") as f:
        for row in csv.DictReader(f):
            for value in row.values():
                if value.endswith(".tif"):
                    with rasterio.open(study / value) as src:
                        itemsize = sum(np.dtype(d).itemsize for d in src.dtypes)
                        total += src.width * src.height * itemsize
    return total


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def du_bytes(path: Path) -> int:
    """Bytes on disk under `path` (du, so sparse and compressed chunks count as stored)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--memory", default="3GiB", help="memory limit per worker")
    parser.add_argument("--keep", action="store_true", help="keep the cube")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cube of an interrupted run: steps and scenes already done are skipped",
    )
    args = parser.parse_args()

    root = WORK / f"ooc-run-{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = make_study(root, args.size, args.tile, args.scenes)
    setup_s = time.perf_counter() - start
    input_gb = scene_input_bytes(study) / 1e9
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    store, out = root / "cube.zarr", root / "results"
    if not args.resume:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    profile = root / "profile.yaml"
    profile.write_text(
        "mbcube:\n  cluster: {kind: local, workers: 2, threads-per-worker: 1,\n"
        f"    memory-limit: {args.memory}, dashboard-address: '127.0.0.1:0'}}\n"
    )
    peaks: dict[str, list[float]] = {}
    load = os.getloadavg()[0]
    print(f"input {input_gb:.1f} GB decoded, RAM {ram_gb:.1f} GB, load {load:.1f}", flush=True)
    with cluster_client(str(profile)) as client, quiet():
        client.wait_for_workers(2, timeout=300)

        def on_progress(message: str) -> None:
            print(message, flush=True)
            match = STEP_LINE.match(message)
            if match is None:
                return
            if match.group(2) == "...":
                client.run(_reset_peak)
            else:
                peaks[match.group(1)] = sorted(client.run(_peak_mib).values())

        pipeline = load_pipeline(study, store=store, out=out, cluster=client.scheduler.address)
        report = run(pipeline, progress=on_progress)
    cube_gb = du_bytes(store) / 1e9
    pixels = args.scenes * args.size**2
    rows = [
        f"| {name} | {report.seconds[name]:.0f} | "
        f"{pixels / 1e6 / report.seconds[name]:.1f} | "
        f"{', '.join(f'{p:.0f}' for p in peaks.get(name, []))} |"
        for name in report.seconds
    ]
    text = (
        f"\n### Out-of-core pipeline run {dt.date.today()} (benchmarks/out_of_core.py)\n\n"
        f"`mbcube run` on a DEM-kind study of {args.scenes} scenes x {args.size}^2 px (tiles "
        f"{args.tile}^2): {input_gb:.1f} GB of decoded scene input on a {ram_gb:.1f} GB machine; "
        f"cube on disk {cube_gb:.1f} GB; 2 local workers x 1 thread, memory limit {args.memory} "
        f"each; load average {load:.1f} at start; study set-up {setup_s:.0f} s (not counted)"
        f"{'; resumed an interrupted run (steps done before are up to date here)' if args.resume else ''}"
        ".\n\n"
        "| step | wall s | scene Mpx/s | peak RSS per worker (MiB, VmHWM) |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
