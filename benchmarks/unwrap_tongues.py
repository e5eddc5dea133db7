"""Glacier tongues beyond h_amb / 2 (issue 14): what the profiles find and repair, and what
they cost.

Two parts, each written to benchmarks/RESULTS-unwrap.md:

- cost: the unwrap step on the `demo` study (1024^2 px, 60 glaciers tapered at their margins, so
  few or no slips), run side by side in child processes, alternating: the code before issue 14
  (a git worktree of OLD_COMMIT) and today's with `unwrap.repair` none and data. CPU seconds
  (user + system, SNAPHU children included) do not depend on what else runs; dh_raw_m compared
  with the old code's pixel by pixel.
- recovery: synthetic `tongues` studies (no margin taper, steep gradients, 30 % surge-type) on
  30 m and 90 m grids, run with `repair` none and data; per scene and glacier the true slips
  are the pixels whose dh_raw_m (plain run) lies a cycle or more from the true change (rate x
  years; datum, ramp, penetration and seasonal offsets are a few metres, far below h_amb / 2).
  A glacier "slips" when some scene slips on >= 20 px and 1 % of it (the flags' own limit).
  Reported: flags found / missed / false (plain run), glaciers recovered within 0.05 m w.e./yr
  (data run), slipping glaciers whose cycles are right after the repair (true slips below the
  limit in every scene), those still slipping and in doubt / not in doubt (must be 0), and
  glaciers more than 3 sigma off without a flag (must be 0).

    .venv/bin/python benchmarks/unwrap_tongues.py [--part cost|recovery|all]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS-unwrap.md")
OLD_COMMIT = "207bbe9"  # main before issue 14
PYTHON = sys.executable


# ----------------------------------------------------------------------------------- cost


CHILD = """
import json, sys
from pathlib import Path
from mbcube.store import recorded_config
from mbcube.unwrap.step import unwrap_cube
store, repair = Path(sys.argv[1]), sys.argv[2]
config = recorded_config(store).unwrap
if repair != "old":
    config = config.model_copy(update={"repair": repair})
unwrap_cube(store, config, force=True)
"""


def _child(code_root: Path, script: str, *args: str) -> None:
    """`script` in a child process importing mbcube from `code_root` (its working directory
    too: `python -c` puts the working directory first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    subprocess.run([PYTHON, "-c", script, *args], check=True, env=env, cwd=code_root)


INGEST = """
import sys
from mbcube.ingest import ingest
ingest(sys.argv[1], sys.argv[2])
"""


def _unwrap_cpu(code_root: Path, store: Path, repair: str) -> float:
    """CPU seconds (user + system, children included) of one unwrap step in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _child(code_root, CHILD, str(store), repair)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cost(work: Path, repeats: int) -> str:
    from mbcube.synth import generate_study

    old_root = work / "old-code"
    if not old_root.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_root), OLD_COMMIT],
            check=True,
        )
    study = work / "demo"
    if not (study / "study.yaml").exists():
        generate_study(study, "demo")
    base = work / "demo.zarr"
    if not base.exists():  # by the old code: its study config is one both codes read
        _child(old_root, INGEST, str(study), str(base))
    cpu: dict[str, list[float]] = {"old": [], "none": [], "data": []}
    stores = {}
    for _ in range(repeats):
        for variant in cpu:
            store = work / f"{variant}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(base, store)
            code = old_root if variant == "old" else ROOT
            cpu[variant].append(_unwrap_cpu(code, store, variant))
            stores[variant] = store
            print(f"cost: {variant} {cpu[variant][-1]:.1f} CPU s", flush=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)])
    old = xr.open_zarr(stores["old"])["dh_raw_m"].values
    lines = [
        f"## {_now()} cost: unwrap step on the `demo` study (1024^2 px, 60 glaciers, 5 scenes)",
        "",
        _machine(),
        "",
        "| code | CPU s per run (each repeat) | median | vs old |",
        "|---|---|---:|---:|",
    ]
    base_median = float(np.median(cpu["old"]))
    for variant, values in cpu.items():
        med = float(np.median(values))
        shown = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {variant} | {shown} | {med:.1f} | {med / base_median:.2f}x |")
    lines.append("")
    for variant in ("none", "data"):
        ds = xr.open_zarr(stores[variant])
        new = ds["dh_raw_m"].values
        same = np.isclose(new, old, equal_nan=True, atol=0.0, rtol=0.0)
        flags = ds["unwrap_flag"].values
        lines.append(
            f"- {variant}: dh_raw_m equal to the old code's on {100 * same.mean():.4f} % of the "
            f"pixels; glacier x scene flags: {int((flags == 1).sum())} repaired, "
            f"{int((flags == 2).sum())} in doubt"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- recovery


def _run(study: Path, where: Path, repair: str) -> Path:
    from mbcube.errors import MbcubeWarning
    from mbcube.pipeline import Pipeline, run

    pipeline = Pipeline(
        study=study,
        store=where / "cube.zarr",
        out=where / "out",
        cluster="local",
        overrides={"unwrap": {"repair": repair}},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MbcubeWarning)
        run(pipeline)
    return where


def _true_slips(store: Path, rate_path: Path) -> np.ndarray:
    """(S, G) pixels of each scene and glacier whose dh_raw_m lies a cycle or more from the
    true change rate x years."""
    ds = xr.open_zarr(store)
    rate = xr.open_dataarray(rate_path, engine="rasterio").squeeze().values
    glacier = ds["glacier_id"].values
    n = ds.sizes["glacier"]
    out = np.zeros((ds.sizes["scene"], n), np.int64)
    for s in range(ds.sizes["scene"]):
        years = float(ds["scene_years"].values[s])
        off = (ds["dh_raw_m"].values[s] - rate * years) / ds["h_amb_m"].values[s]
        slipped = np.isfinite(off) & (np.abs(np.rint(off)) >= 1) & (glacier > 0)
        out[s] = np.bincount(glacier[slipped], minlength=n + 1)[1:]
    return out


def recovery_case(work: Path, name: str, **spec: Any) -> dict[str, Any]:
    from mbcube.synth import generate_study

    study = generate_study(work / name / "study", "tongues", **spec)
    truth = pd.read_csv(study / "truth" / "glaciers.csv")[["RGIId", "mb_mwe_yr"]]
    tables = {}
    for repair in ("none", "data"):
        where = _run(study, work / name / repair, repair)
        table = pd.read_csv(where / "out" / "glaciers.csv").merge(
            truth, on="RGIId", suffixes=("", "_true")
        )
        table["error"] = table["mb_mwe_yr"] - table["mb_mwe_yr_true"]
        tables[repair] = table
    plain_store = work / name / "none" / "cube.zarr"
    slips = _true_slips(plain_store, study / "truth" / "dhdt_m_yr.tif")
    px = xr.open_zarr(plain_store)["unwrap_glacier_px"].values
    slipping = ((slips >= 20) & (slips >= 0.01 * np.maximum(px, 1))).any(axis=0)
    fixed_store = work / name / "data" / "cube.zarr"
    left = _true_slips(fixed_store, study / "truth" / "dhdt_m_yr.tif")
    px_fixed = xr.open_zarr(fixed_store)["unwrap_glacier_px"].values
    still = ((left >= 20) & (left >= 0.01 * np.maximum(px_fixed, 1))).any(axis=0)
    plain, data = tables["none"], tables["data"]
    measured = plain["mb_mwe_yr"].notna().to_numpy()
    flagged = plain["unwrap_flag"].to_numpy() > 0
    z = (data["error"].abs() / data["mb_sigma_mwe_yr"]).to_numpy()
    z_plain = (plain["error"].abs() / plain["mb_sigma_mwe_yr"]).to_numpy()
    fixed = data["unwrap_flag"].to_numpy() == 1
    doubt = data["unwrap_flag"].to_numpy() == 2
    recovered = slipping & (data["error"].abs().to_numpy() < 0.05)
    return {
        "case": name,
        "glaciers": int(measured.sum()),
        "slipping": int((slipping & measured).sum()),
        "found": int((slipping & flagged & measured).sum()),
        "missed": int((slipping & ~flagged & measured).sum()),
        "false": int((~slipping & flagged & measured).sum()),
        "recovered": int((recovered & measured).sum()),
        "cycles_right_after": int((slipping & ~still & measured).sum()),
        "still_slipping_flagged": int((still & measured & doubt).sum()),
        "still_slipping_not_in_doubt": int((still & measured & ~doubt).sum()),
        "repaired": int((fixed & measured).sum()),
        "in_doubt": int((doubt & measured).sum()),
        "in_doubt_within_3_sigma": int((doubt & measured & (z <= 3)).sum()),
        "plain_max_error": float(plain.loc[slipping & measured, "error"].abs().max())
        if (slipping & measured).any()
        else 0.0,
        "repaired_max_error": float(data.loc[fixed & measured, "error"].abs().max())
        if (fixed & measured).any()
        else 0.0,
        "unflagged_over_3_sigma": int(
            (measured & (data["unwrap_flag"].to_numpy() == 0) & (z > 3)).sum()
            + (measured & ~flagged & (z_plain > 3)).sum()
        ),
        "median_error_unflagged": float(
            data.loc[measured & (data["unwrap_flag"].to_numpy() == 0), "error"].abs().median()
        ),
    }


def recovery(work: Path) -> str:
    cases = [
        recovery_case(work, "tongues-30m", size_px=1536, tile_px=512, n_glaciers=40, n_scenes=4),
        recovery_case(
            work, "tongues-90m", size_px=768, tile_px=256, res_m=90.0, n_glaciers=40, n_scenes=4
        ),
    ]
    header = list(cases[0])
    lines = [
        f"## {_now()} recovery: synthetic `tongues` studies, repair none vs data",
        "",
        _machine(),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for case in cases:
        lines.append(
            "| "
            + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in case.values())
            + " |"
        )
    print(json.dumps(cases, indent=1))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), load average at start {load:.1f}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "recovery", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mbcube-tongues-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = []
    if args.part in ("cost", "all"):
        sections.append(cost(work, args.repeats))
    if args.part in ("recovery", "all"):
        sections.append(recovery(work))
    with RESULTS.open("a") as f:
        for section in sections:
            f.write("\n" + section)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
