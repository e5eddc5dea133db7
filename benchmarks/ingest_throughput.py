"""Ingest throughput and peak memory on a study larger than a few GB of decoded rasters.

A synthetic study (one generated insar scene on a SIZE x SIZE grid) is made once; its scene files
are then hard-linked under N_SCENES scene ids and dates, so the input holds N_SCENES full scenes
(phase, coherence, layover mask) without generating each. The ingest runs in a child process:
wall time, pixel throughput and the child's peak RSS are reported and appended to RESULTS.md.

    .venv/bin/python benchmarks/ingest_throughput.py --size 6000 --scenes 14
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

from mbcube.synth import generate_study

RESULTS = Path(__file__).with_name("RESULTS.md")


def make_study(root: Path, size_px: int, n_scenes: int) -> Path:
    """A study with `n_scenes` scenes on a size_px^2 grid (scene files hard-linked)."""
    study = root / "study"
    if not (study / "scenes.csv").exists():
        generate_study(
            study, "large", size_px=size_px, n_glaciers=size_px // 8, n_scenes=1, other_crs=None
        )
    with open(study / "scenes.csv") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    out_rows = []
    for i in range(n_scenes):
        row = dict(first)
        date = dt.date(2011, 10, 1) + dt.timedelta(days=11 * i)
        row["scene_id"], row["date"] = f"B{i:02d}", date.isoformat()
        for key in ("phase", "coherence", "mask"):
            if row.get(key):
                src = study / first[key]
                dst = src.with_name(f"B{i:02d}_{key}.tif")
                if not dst.exists():
                    os.link(src, dst)
                row[key] = str(dst.relative_to(study))
        out_rows.append(row)
    with open(study / "scenes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(first))
        writer.writeheader()
        writer.writerows(out_rows)
    return study


def decoded_bytes(study: Path) -> int:
    """Bytes of all input rasters once decoded (width x height x itemsize x bands)."""
    total = 0
    for path in study.rglob("*.tif"):
        if "truth" in path.parts:
            continue
        with rasterio.open(path) as src:
            itemsize = sum(np.dtype(dtype).itemsize for dtype in src.dtypes)
            total += src.width * src.height * itemsize
    return total


def run_ingest(study: Path, store: Path) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of `mbcube ingest` in a child process."""
    shutil.rmtree(store, ignore_errors=True)
    code = "import sys; from mbcube.ingest import ingest; ingest(sys.argv[1], sys.argv[2])"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(study), str(store)], check=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000, help="grid size (px per side)")
    parser.add_argument("--scenes", type=int, default=14)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mbcube-bench-ingest"))
    args = parser.parse_args()
    study = make_study(args.workdir, args.size, args.scenes)
    input_gb = decoded_bytes(study) / 1e9
    wall, peak_mib = run_ingest(study, args.workdir / "cube.zarr")
    mpix = args.scenes * args.size**2 / 1e6
    line = (
        f"| {dt.date.today()} | {args.size}^2 x {args.scenes} scenes | {input_gb:.2f} GB | "
        f"{wall:.1f} s | {mpix / wall:.1f} Mpix/s ({input_gb * 1e3 / wall:.0f} MB/s) | "
        f"{peak_mib:.0f} MiB | {os.cpu_count()} cores |"
    )
    print(line)
    with open(RESULTS, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
