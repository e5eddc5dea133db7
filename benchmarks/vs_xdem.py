"""mbcube and xdem 0.2.3 side by side on the Exploradores DEM pair with a known change.

    python benchmarks/vs_xdem.py --install-xdem     # first time: makes the xdem venv (PyPI)
    python benchmarks/vs_xdem.py                    # runs both, writes RESULTS-vs-xdem.md

Files: ../shared/data/exploradores/injected-change (ref_t1 = later DEM, tba_t0 = earlier DEM,
shifted, biased, ramped, noisy, with voids) and the 47 RGI 6.0 outlines; truth in params.json
(glacier-wide mean dh -13.80 m over 12.10 yr, dV -2.067 km3).

Each tool runs in its own fresh process (mbcube in this project's venv, xdem in a separate venv
so that its pins cannot touch ours); wall time is the process's, peak RSS is the process's
maximum resident set (os.wait4), so both include imports.

- mbcube: `mbcube.pipeline.run` on pipelines/exploradores.yaml (dask threads, one process):
  ingest, Nuth & Kaab co-registration, datum, bilinear ramp, binning, hypsometric mean.
- xdem 0.2.3: NuthKaab, and NuthKaab + Deramp(poly_order=1), fitted on stable ground (outside
  the outlines), dh = ref - aligned, `xdem.volume.hypsometric_binning` (50 m bins on the reference DEM),
  `interpolate_hypsometric_bins`, `calculate_hypsometry_area`, as its documentation shows.
  Further xdem rows use the same co-registered dh with each bin's median put back in its own
  bin (GlacioHack/xdem issue 786: 0.2.3 shifts every bin's value by one row).

Only the standard library is imported at module level: the xdem worker runs in the xdem venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("MBCUBE_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
PAIR = DATA / "exploradores" / "injected-change"
OUTLINES = DATA / "exploradores" / "17_rgi60_glacier_outlines.gpkg"
DEFAULT_VENV = Path(tempfile.gettempdir()) / "mbcube-xdem-venv"
XDEM_VERSION = "0.2.3"
BIN_WIDTH_M = 50.0
DENSITY = 0.85
XDEM_LABELS = {
    "nk": "NuthKaab, hypsometric_binning",
    "nk_fixed": "NuthKaab, bins not shifted (issue 786 fixed)",
    "nk_deramp": "NuthKaab + Deramp(1), hypsometric_binning",
    "nk_deramp_fixed": "NuthKaab + Deramp(1), bins not shifted (issue 786 fixed)",
}


# ---------------------------------------------------------------- workers (one process each)


def worker_mbcube(out_json: Path, work: Path) -> None:
    """Run the mbcube pipeline on pipelines/exploradores.yaml; write the glacier-wide result."""
    import pandas as pd
    import xarray as xr

    from mbcube.cluster import quiet
    from mbcube.pipeline import load_pipeline, run

    pipeline = load_pipeline(
        REPO / "pipelines" / "exploradores.yaml",
        store=work / "cube.zarr",
        out=work / "results",
        cluster="threads",
    )
    with quiet():
        run(pipeline, force=True)
    regions = pd.read_csv(work / "results" / "regions.csv")
    row = regions[(regions["name"] == "all") & (regions["glaciers"] == "all")].iloc[0]
    years = float(xr.open_zarr(work / "cube.zarr")["scene_years"].values[0])
    span = abs(years)  # the period of the rate (scene earlier than the reference: years < 0)
    result = {
        "dh_m": float(row["dhdt_m_yr"]) * span,
        "dv_km3": float(row["volume_km3_yr"]) * span,
        "area_km2": float(row["area_km2"]),
        "dhdt_m_yr": float(row["dhdt_m_yr"]),
        "mb_mwe_yr": float(row["mb_mwe_yr"]),
        "mb_sigma_mwe_yr": float(row["mb_sigma_mwe_yr"]),
        # dh's own 1-sigma: the measurement terms (random, datum, seasonal, penetration), in m
        "dh_sigma_m": float(
            sum(
                float(row[f"sigma_{term}_mwe_yr"]) ** 2
                for term in ("random", "datum", "seasonal", "penetration")
            )
            ** 0.5
        )
        / DENSITY
        * span,
    }
    out_json.write_text(json.dumps(result))


def worker_xdem(out_json: Path) -> None:
    """xdem 0.2.3's documented workflow on the same files (runs in the xdem venv)."""
    import geoutils as gu
    import numpy as np
    import xdem

    params = json.loads((PAIR / "params.json").read_text())
    ref = xdem.DEM(str(PAIR / "ref_t1.tif"))
    tba = xdem.DEM(str(PAIR / "tba_t0.tif"))
    glaciers = gu.Vector(str(OUTLINES)).create_mask(ref)
    stable = ~glaciers
    years = params["dt_years"]
    result = {}
    for label, coreg in (
        ("nk", xdem.coreg.NuthKaab()),
        ("nk_deramp", xdem.coreg.NuthKaab() + xdem.coreg.Deramp(poly_order=1)),
    ):
        coreg.fit(ref, tba, inlier_mask=stable)
        ddem = ref - coreg.apply(tba)  # later minus earlier
        ddem_g, ref_g = ddem[glaciers], ref[glaciers]
        bins = xdem.volume.hypsometric_binning(ddem_g, ref_g, bins=BIN_WIDTH_M, kind="fixed")
        filled = xdem.volume.interpolate_hypsometric_bins(bins)
        area = xdem.volume.calculate_hypsometry_area(filled, ref_g, pixel_size=ref.res[0])
        total_area = float(area.sum())
        # the same co-registered dh, each bin's median in its own bin (issue 786 fixed)
        dh = np.ma.filled(ddem_g.astype(float), np.nan).ravel()
        z = np.ma.filled(ref_g.astype(float), np.nan).ravel()
        valid = np.isfinite(dh) & np.isfinite(z)
        edges = np.r_[[bins.index.left[0]], bins.index.right]
        which = np.digitize(z[valid], edges) - 1
        own = [
            np.nanmedian(dh[valid][which == i]) if (which == i).any() else np.nan
            for i in range(len(bins))
        ]
        fixed = bins.copy()
        fixed["value"] = own
        fixed = xdem.volume.interpolate_hypsometric_bins(fixed)
        for suffix, table in (("", filled), ("_fixed", fixed)):
            dv = float((table["value"] * area).sum())
            result[label + suffix] = {
                "dh_m": dv / total_area,
                "dv_km3": dv / 1e9,
                "area_km2": total_area / 1e6,
                "dhdt_m_yr": dv / total_area / years,
            }
    out_json.write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def install_xdem(venv: Path) -> Path:
    """Create `venv` and install xdem==0.2.3 into it from the package registry; its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"xdem=={XDEM_VERSION}"], check=True)
    return python


def timed(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run cmd (stderr to `log`); return (wall s, peak RSS MiB of that process, exit status)."""
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def last_error(log: Path) -> str:
    """The last line of a failed worker's stderr (its exception), for the table."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1].replace("|", "/")[:300] if lines else "no message"


def _row(name: str, r: dict[str, float] | None, truth: dict[str, float], extra: str) -> str:
    if r is None:
        return f"| {name} | failed | | | | | | {extra} |"
    dh_err = 100 * (r["dh_m"] - truth["true_mean_dh_m"]) / abs(truth["true_mean_dh_m"])
    dv_err = 100 * (r["dv_km3"] - truth["true_dV_km3"]) / abs(truth["true_dV_km3"])
    sigma = f"{r['dh_sigma_m']:.2f}" if "dh_sigma_m" in r else "n/a"
    return (
        f"| {name} | {r['dh_m']:.2f} | {dh_err:+.1f} % | {sigma} | {r['dv_km3']:.3f} | "
        f"{dv_err:+.1f} % | {r['area_km2']:.2f} | {extra} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install-xdem", action="store_true", help="create the xdem venv first")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the xdem venv")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-vs-xdem.md")
    parser.add_argument("--worker", choices=["mbcube", "xdem"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "mbcube":
        worker_mbcube(args.json, args.work)
        return 0
    if args.worker == "xdem":
        worker_xdem(args.json)
        return 0

    if not PAIR.exists():
        print(f"real data not available: {PAIR} is missing", file=sys.stderr)
        return 2
    truth = json.loads((PAIR / "params.json").read_text())
    python_xdem = args.venv / "bin" / "python"
    if args.install_xdem:
        python_xdem = install_xdem(args.venv)
    with tempfile.TemporaryDirectory(prefix="vs_xdem_") as tmp:
        work = Path(tmp)
        mb_json, xd_json = work / "mbcube.json", work / "xdem.json"
        me = [sys.executable, str(Path(__file__).resolve())]
        mb_wall, mb_rss, mb_rc = timed(
            [*me, "--worker", "mbcube", "--json", str(mb_json), "--work", str(work)],
            work / "mbcube.log",
        )
        mbcube = json.loads(mb_json.read_text()) if mb_rc == 0 else None
        mb_note = f"{mb_wall:.1f} s, {mb_rss:.0f} MiB"
        if mbcube is None:
            mb_note += f"; failed: {last_error(work / 'mbcube.log')}"
        xd = None
        xd_wall = xd_rss = float("nan")
        xdem_note = ""
        if python_xdem.exists():
            xd_wall, xd_rss, xd_rc = timed(
                [
                    str(python_xdem),
                    str(Path(__file__).resolve()),
                    "--worker",
                    "xdem",
                    "--json",
                    str(xd_json),
                ],
                work / "xdem.log",
            )
            xd = json.loads(xd_json.read_text()) if xd_rc == 0 else None
            if xd is None:
                xdem_note = f"failed: {last_error(work / 'xdem.log')}"
        else:
            xdem_note = f"xdem venv {args.venv} not found: run with --install-xdem"

    def version() -> str:
        if not python_xdem.exists():
            return "not installed"
        got = subprocess.run(
            [str(python_xdem), "-c", "import xdem; print(xdem.__version__)"],
            capture_output=True,
            text=True,
        )
        return got.stdout.strip() or "unknown"

    lines = [
        "# mbcube vs xdem on the Exploradores DEM pair (known change)",
        "",
        f"Written by `benchmarks/vs_xdem.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"machine: {os.cpu_count()} cores. xdem version: {version()}.",
        "",
        "Data: `../shared/data/exploradores/injected-change` (618 x 539 px, 30 m, EPSG:32718); "
        f"truth: glacier-wide mean dh {truth['true_mean_dh_m']:.2f} m over {truth['dt_years']:.2f} yr, "
        f"dV {truth['true_dV_km3']:.3f} km3, glacier area {truth['glacier_area_km2']:.2f} km2.",
        "dh is later minus earlier (the truth's sign); mbcube's dh = scene - reference with the "
        "earlier DEM as the scene, converted through its rate (dh/dt x |period|).",
        "",
        "| method | mean dh (m) | error | stated 1-sigma dh (m) | dV (km3) | error | area (km2) | wall time, peak RSS |",
        "|---|---|---|---|---|---|---|---|",
        _row(
            "truth",
            {
                "dh_m": truth["true_mean_dh_m"],
                "dv_km3": truth["true_dV_km3"],
                "area_km2": truth["glacier_area_km2"],
            },
            truth,
            "",
        ),
        _row("mbcube (pipelines/exploradores.yaml)", mbcube, truth, mb_note),
        *[
            _row(
                f"xdem {XDEM_VERSION}: {XDEM_LABELS[key]}",
                xd[key] if xd else None,
                truth,
                (f"{xd_wall:.1f} s, {xd_rss:.0f} MiB (all four rows)" if xd else xdem_note)
                if key == "nk"
                else ("same run" if xd else xdem_note),
            )
            for key in XDEM_LABELS
        ],
        "",
        "Wall time and peak RSS are per process, imports included (mbcube: one process, dask "
        "threads; it also writes the cube, tables, figures and report). mbcube's stated 1-sigma "
        "of dh is its measurement terms (random, datum, seasonal, penetration; m w.e./yr) / 0.85 "
        "x |period|; the mass-balance sigma below adds the density term.",
    ]
    if mbcube is not None:
        lines += [
            "",
            f"mbcube: dh/dt {mbcube['dhdt_m_yr']:.4f} m/yr (truth {truth['true_mean_dh_m_per_yr']:.4f}), "
            f"mass balance {mbcube['mb_mwe_yr']:.4f} +- {mbcube['mb_sigma_mwe_yr']:.4f} m w.e./yr "
            f"(truth at 850 kg/m3: {truth['true_mean_dh_m_per_yr'] * DENSITY:.4f}).",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0 if mbcube is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
