"""Whole-scene vs tiled unwrapping of one hard SIZE x SIZE scene: wall time, peak RSS,
agreement, accuracy against the truth, and the cost of stitching + tie alone.

The scene is the hard case of tests/test_unwrap.py (low-coherence glaciers with 4 looks, many
layover holes, a glacier behind a masked ring across a tile border, an enclosed island), stored
as Zarr in tiles of TILE px. Each run is a child process that reads it lazily:

- whole: `unwrap_scene(mode="whole")`, one SNAPHU run on the whole scene (synchronous scheduler);
- tiled: `unwrap_scene(mode="tiled")` on a distributed LocalCluster of WORKERS single-thread
  worker processes; task durations come from the scheduler's task stream, peak RSS per worker
  from each worker (its own peak plus the peak of its SNAPHU children).

    .venv/bin/python benchmarks/unwrap_tiled_vs_whole.py --size 4096 --tile 1024 --halo 64

Results are written to benchmarks/RESULTS-unwrap.md (the run's numbers are appended).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).with_name("RESULTS-unwrap.md")
LAYERS = ("phase_rad", "coherence", "h_amb_m", "radar_mask", "stable")


def make_inputs(work: Path, size: int, tile: int, seed: int) -> None:
    from tests.test_unwrap import make_hard_scene

    if (work / "inputs.zarr" / "zarr.json").exists():
        return
    start = time.perf_counter()
    scene = make_hard_scene(size, tile, seed)
    group = zarr.open_group(str(work / "inputs.zarr"), mode="w")
    for name in (*LAYERS, "dh_true_m", "glacier", "island"):
        data = np.asarray(getattr(scene, name))
        group.create_array(name, data=data, chunks=(tile, tile))
    print(f"inputs: {size}^2 px in {time.perf_counter() - start:.0f} s", flush=True)


def _peak_rss_mb() -> dict[str, float]:
    """This process's peak RSS and the peak of its waited-for children (SNAPHU), MB; and the
    CPU seconds (user + system) of both, which do not depend on what else runs."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "self_mb": me.ru_maxrss / 1024,
        "children_mb": kids.ru_maxrss / 1024,
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
    }


def _warm_up() -> None:
    import scipy.ndimage
    import snaphu

    import mbcube.unwrap.scene

    del scipy.ndimage, snaphu, mbcube.unwrap.scene


def _inputs(work: Path) -> dict[str, da.Array]:
    group = zarr.open_group(str(work / "inputs.zarr"), mode="r")
    return {name: da.from_zarr(group[name]) for name in LAYERS}


def run_whole(work: Path, halo: int) -> dict[str, Any]:
    import dask

    from mbcube.config import UnwrapConfig
    from mbcube.unwrap import unwrap_scene

    arrays = _inputs(work)
    out = unwrap_scene(
        *(arrays[n] for n in LAYERS), config=UnwrapConfig(mode="whole", halo_px=halo)
    )
    cpu0 = _peak_rss_mb()["cpu_s"]
    start = time.perf_counter()
    comp, dh, quality = dask.compute(out.component, out.dh_raw_m, out.quality, scheduler="sync")
    wall = time.perf_counter() - start
    cpu = _peak_rss_mb()["cpu_s"] - cpu0
    np.save(work / "whole_dh.npy", dh)
    np.save(work / "whole_comp.npy", comp)
    return {
        "wall_s": wall,
        **_peak_rss_mb(),
        "compute_cpu_s": cpu,
        "quality": {k: v.item() for k, v in quality.items()},
    }


def run_tiled(work: Path, halo: int, workers: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster, get_task_stream

    from mbcube.config import UnwrapConfig
    from mbcube.unwrap import unwrap_scene

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, memory_limit="10GiB", dashboard_address=None
    )
    with cluster, Client(cluster) as client:
        arrays = _inputs(work)
        out = unwrap_scene(
            *(arrays[n] for n in LAYERS), config=UnwrapConfig(mode="tiled", halo_px=halo)
        )
        client.run(_warm_up)  # imports, so that they are not counted
        cpu0 = client.run(_peak_rss_mb)
        start = time.perf_counter()
        with get_task_stream(client) as stream:
            comp, dh, quality = client.compute(
                [out.component, out.dh_raw_m, out.quality], sync=True
            )
        wall = time.perf_counter() - start
        rss = client.run(_peak_rss_mb)
        for name, before in cpu0.items():
            rss[name]["compute_cpu_s"] = rss[name]["cpu_s"] - before["cpu_s"]
    seconds: dict[str, float] = {}
    for record in stream.data:
        key = str(record["key"]).strip("()',")
        kind = key.split("-")[1] if key.startswith("unwrap-") else "io/assembly"
        for ss in record["startstops"]:
            if ss["action"] == "compute":
                seconds[kind] = seconds.get(kind, 0.0) + ss["stop"] - ss["start"]
    np.save(work / "tiled_dh.npy", dh)
    np.save(work / "tiled_comp.npy", comp)
    return {
        "wall_s": wall,
        "workers": {str(k): v for k, v in rss.items()},
        "task_seconds": seconds,
        "quality": {k: np.asarray(v).item() for k, v in quality.items()},
    }


def child(mode: str, work: Path, halo: int, workers: int) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", mode, "--work", str(work), "--halo", str(halo)]
    args += ["--workers", str(workers)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(work: Path) -> dict[str, float]:
    group = zarr.open_group(str(work / "inputs.zarr"), mode="r")
    truth, h_amb = group["dh_true_m"][:], group["h_amb_m"][:]
    glacier, island, stable = group["glacier"][:], group["island"][:], group["stable"][:]
    out: dict[str, float] = {}
    dh = {m: np.load(work / f"{m}_dh.npy") for m in ("whole", "tiled")}
    comp = {m: np.load(work / f"{m}_comp.npy") for m in ("whole", "tiled")}
    same = (np.isnan(dh["whole"]) & np.isnan(dh["tiled"])) | (np.abs(dh["whole"] - dh["tiled"]) < 1)
    out["agreement"] = float(same.mean())
    out["disagreeing_px"] = int((~same).sum())
    for m in ("whole", "tiled"):
        c = comp[m]
        cycles = np.rint((dh[m] - truth) / h_amb)
        # oracle tie per component: rint(median(true dh / h_amb)) on its stable pixels
        order = np.argsort(c[stable == 1], kind="stable")
        vals = (truth / h_amb)[stable == 1][order]
        labels = c[stable == 1][order]
        expect = np.full(int(c.max()) + 1, np.nan)
        bounds = np.flatnonzero(np.diff(labels)) + 1
        for part_l, part_v in zip(np.split(labels, bounds), np.split(vals, bounds), strict=True):
            if part_l.size and part_l[0] > 0:
                expect[part_l[0]] = np.rint(np.median(part_v))
        pick = glacier & (c > 0) & ~island
        right = np.isfinite(dh[m]) & (cycles == expect[c])
        out[f"{m}_glacier_right"] = float(right[pick].mean())
        out[f"{m}_glacier_unwrapped_px"] = int(pick.sum())
    return out


def write_results(args: argparse.Namespace, whole: dict, tiled: dict, cmp: dict) -> str:
    n_px = args.size**2
    t = tiled["task_seconds"]
    stitch_s = sum(t.get(k, 0.0) for k in ("summary", "edge", "solve", "finish"))
    worker_peaks = [w["self_mb"] + w["children_mb"] for w in tiled["workers"].values()]
    window = args.tile + 2 * args.halo
    worker_cpu = [w["compute_cpu_s"] for w in tiled["workers"].values()]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.size}^2 px, tile "
        f"{args.tile} px, halo {args.halo} px, {args.workers} workers",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average at start {args.load:.1f} (other jobs were running).",
        "",
        "| run | wall (s) | CPU (s) | peak RSS | notes |",
        "|---|---:|---:|---:|---|",
        f"| whole scene (1 SNAPHU run) | {whole['wall_s']:.1f} | {whole['compute_cpu_s']:.1f} | "
        f"{whole['self_mb'] + whole['children_mb']:.0f} MB (python {whole['self_mb']:.0f} + "
        f"snaphu {whole['children_mb']:.0f}) | |",
        f"| tiled, {args.workers} workers | {tiled['wall_s']:.1f} | "
        f"{' + '.join(f'{c:.1f}' for c in worker_cpu)} | "
        f"{max(worker_peaks):.0f} MB per worker (max; "
        + ", ".join(
            f"{w['self_mb']:.0f} + snaphu {w['children_mb']:.0f}" for w in tiled["workers"].values()
        )
        + f") | window {window}^2 px |",
        "",
        f"- speed-up tiled vs whole, wall clock: **{whole['wall_s'] / tiled['wall_s']:.2f}x**; "
        f"from CPU seconds (whole CPU / busiest worker's CPU, i.e. on an otherwise idle "
        f"machine): **{whole['compute_cpu_s'] / max(worker_cpu):.2f}x**; total CPU tiled / whole "
        f"{sum(worker_cpu) / whole['compute_cpu_s']:.2f}",
        f"- tiled vs whole agreement (same NaN pattern, |dh| diff < 1 m): "
        f"**{100 * cmp['agreement']:.4f} %** ({cmp['disagreeing_px']} px differ)",
        f"- valid glacier pixels (unwrapped, island excluded) on the true cycle: whole "
        f"{100 * cmp['whole_glacier_right']:.3f} %, tiled {100 * cmp['tiled_glacier_right']:.3f} % "
        f"of {cmp['tiled_glacier_unwrapped_px']} px",
        "- task compute seconds (tiled, summed over workers): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(t.items())),
        f"- stitching + tie alone (summaries, edges, solve, finish): {stitch_s:.2f} s = "
        f"**{n_px / stitch_s / 1e6:.1f} Mpx/s**, "
        f"**{100 * stitch_s / t.get('tile', float('nan')):.1f} %** of the unwrapping tasks",
        f"- quality (tiled): {json.dumps({k: round(v, 5) for k, v in tiled['quality'].items()})}",
        f"- quality (whole): {json.dumps({k: round(v, 5) for k, v in whole['quality'].items()})}",
        "",
    ]
    text = "\n".join(lines)
    header = (
        "# Unwrapping: whole scene vs tiled\n\n"
        "Made by `benchmarks/unwrap_tiled_vs_whole.py` (see its docstring). Newest last.\n\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else header
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", choices=["whole", "tiled"], default=None)
    args = parser.parse_args()
    if args.child:
        result = (
            run_whole(args.work, args.halo)
            if args.child == "whole"
            else run_tiled(args.work, args.halo, args.workers)
        )
        print(json.dumps(result))
        return
    args.load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="unwrap-bench-") as tmp:
        work = args.work or Path(tmp)
        make_inputs(work, args.size, args.tile, args.seed)
        whole = child("whole", work, args.halo, args.workers)
        print(f"whole: {whole['wall_s']:.1f} s", flush=True)
        tiled = child("tiled", work, args.halo, args.workers)
        print(f"tiled: {tiled['wall_s']:.1f} s", flush=True)
        print(write_results(args, whole, tiled, compare(work)))


if __name__ == "__main__":
    main()
