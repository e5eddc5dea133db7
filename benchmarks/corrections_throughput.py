"""Corrections throughput and peak memory, against one plain numpy pass over the same data.

The cube: a synthetic DEM-kind study on a SIZE x SIZE grid (tile 1024), one generated scene
hard-linked under N_SCENES ids and winter dates, ingested once (the ingest benchmark's trick).
Each measurement runs in a child process (wall time, child peak RSS):

- `correct`: `correct_cube(store, force=True)` on all scenes (co-registration, ramp, datum,
  penetration, seasonal, outliers; writes dh_m and valid);
- `bound`: per scene, dh = dem_m - ref_dem_m - nanmedian over each tile, written to a scratch
  Zarr array with the same chunks: one read of the inputs, one numpy expression, one write.

Both are timed in wall-clock time and in CPU time (user + system of the child process tree,
getrusage): the CPU ratio bound / correct hardly moves with the machine's load (other processes
take cores, not CPU time), the wall ratio is the one to read on an idle machine. Each run appends
one row per repeat to RESULTS-corrections.md (date and time UTC, commit, load average).

    .venv/bin/python benchmarks/corrections_throughput.py --repeat 3
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS-corrections.md")


def make_cube(root: Path, size_px: int, n_scenes: int) -> Path:
    """A DEM-kind study with `n_scenes` hard-linked scenes, ingested into root/cube.zarr."""
    from mbcube.cluster import quiet
    from mbcube.ingest import ingest
    from mbcube.synth import generate_study

    study, store = root / "study", root / "cube.zarr"
    if (store / "zarr.json").exists():
        return store
    if not (study / "reference").exists():
        generate_study(
            study,
            "large",
            size_px=size_px,
            tile_px=1024,
            n_glaciers=size_px // 8,
            n_scenes=1,
            kind="dem",
            other_crs=None,
        )
    src = sorted((study / "scenes").glob("S01_*_dem.tif"))[0]
    months, rows = [10, 11, 12, 1, 2, 3, 4], []
    for i in range(n_scenes):
        m = months[i % 7]
        dst = src.with_name(f"B{i:02d}_dem.tif")
        if not dst.exists():
            os.link(src, dst)
        date = dt.date(2011 + (m <= 4) + i // 7, m, 10)
        rows.append(
            {
                "scene_id": f"B{i:02d}",
                "date": date.isoformat(),
                "kind": "dem",
                "dem": str(dst.relative_to(study)),
            }
        )
    with open(study / "scenes.csv", "w", newline="") as f:
        fields = [
            "scene_id",
            "date",
            "kind",
            "phase",
            "coherence",
            "h_amb",
            "mask",
            "dem",
            "nlooks",
        ]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with quiet():
        ingest(study, store)
    return store


def run_correct(store: Path) -> None:
    from mbcube.cluster import quiet
    from mbcube.corrections import correct_cube

    with quiet():
        correct_cube(store, force=True)


def run_bound(store: Path) -> None:
    import dask
    import numpy as np

    from mbcube.store import open_cube

    ds = open_cube(store)
    scratch = store.parent / "bound.zarr"
    ref = ds.ref_dem_m.data
    for i in range(ds.sizes["scene"]):
        dh = ds.dem_m.data[i] - ref
        dh = dh.map_blocks(lambda b: (b - np.nanmedian(b)).astype(np.float32), dtype=np.float32)
        dask.compute(dh.to_zarr(str(scratch), component=f"s{i}", overwrite=True, compute=False))


def child(mode: str, store: Path) -> tuple[float, float]:
    """Run `mode` in a child process: (wall s, CPU s = user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", mode, "--store", str(store)], check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


HEADER = (
    "| date (UTC) | commit | load 1 min | cube (scene x y x x) | cores | correct s | correct CPU s "
    "| bound s | bound CPU s | % of bound (wall) | % of bound (CPU) | Mpix/s/core | peak RSS GiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _commit() -> str:
    """The short commit of the repository, '+' if the package or benchmarks differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "mbcube", "benchmarks/*.py")
    return (git("rev-parse", "--short", "HEAD") or "?") + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/mbcube-bench-corrections"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="bound + correct pairs, in turn")
    parser.add_argument("--child", choices=["correct", "bound"])
    parser.add_argument("--store", type=Path)
    args = parser.parse_args()
    if args.child == "correct":
        return run_correct(args.store)
    if args.child == "bound":
        return run_bound(args.store)
    args.root.mkdir(parents=True, exist_ok=True)
    store = make_cube(args.root, args.size, args.scenes)
    from mbcube.store import open_cube

    ds = open_cube(store)
    mpix = ds.sizes["scene"] * ds.sizes["y"] * ds.sizes["x"] / 1e6
    cores = os.cpu_count() or 1
    commit = _commit()
    if not RESULTS.exists():
        RESULTS.write_text("# Corrections throughput\n\n" + HEADER)
    for _ in range(args.repeat):
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
        load = os.getloadavg()[0]
        bound_s, bound_cpu = child("bound", store)
        correct_s, correct_cpu = child("correct", store)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # max over children
        line = (
            f"| {when} | {commit} | {load:.1f} | {ds.sizes['scene']} x {ds.sizes['y']} x "
            f"{ds.sizes['x']} | {cores} | {correct_s:.1f} | {correct_cpu:.1f} | {bound_s:.1f} "
            f"| {bound_cpu:.1f} | {100 * bound_s / correct_s:.0f} % "
            f"| {100 * bound_cpu / correct_cpu:.0f} % | {mpix / correct_s / cores:.2f} | {rss:.2f} |"
        )
        print(line, flush=True)
        with open(RESULTS, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
