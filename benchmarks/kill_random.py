"""Randomized kills: `mbcube run` SIGKILLed at random times, then run to the end, many times.

A small mixed study (insar and dem scenes: every step, unwrapping included) is run once without
interruption: its tables and cube are the reference. Then, for each trial (seeded), a fresh store
is made by runs of `mbcube run` each SIGKILLed after a random delay (uniform over the
uninterrupted run's wall time), 1 to MAX_KILLS of them (a run that finishes before its kill time
ends the series), then one run to the end. The result must
equal the reference: glaciers.csv and regions.csv byte for byte, the corrected pixels (dh_m,
valid) and the binned statistics identical, and `mbcube verify` clean. Half of the trials also
change a correction parameter for the killed runs and revert it for the last one (the
kill-then-revert probe of issue 18). Results are appended to RESULTS-kill.md.

    .venv/bin/python benchmarks/kill_random.py --trials 30 --seed 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from mbcube.store import open_cube
from mbcube.synth import generate_study
from mbcube.verify import verify

RESULTS = Path(__file__).with_name("RESULTS-kill.md")
CODE = "import sys; from mbcube.cli import app; sys.argv[0] = 'mbcube'; app()"
MAX_KILLS = 3
TABLES = ("glaciers.csv", "regions.csv")


def mbcube_run(study: Path, store: Path, out: Path) -> subprocess.Popen[bytes]:
    args = ["run", str(study), "--store", str(store), "--out", str(out), "--cluster", "threads"]
    return subprocess.Popen(
        [sys.executable, "-c", CODE, *args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_to_end(study: Path, store: Path, out: Path) -> float:
    start = time.perf_counter()
    proc = mbcube_run(study, store, out)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"mbcube run failed ({proc.returncode}): {err.decode()}")
    return time.perf_counter() - start


def same_result(store: Path, out: Path, reference: Path) -> list[str]:
    """What differs from the reference run (empty: identical)."""
    differs = []
    for name in TABLES:
        if (out / name).read_bytes() != (reference / "results" / name).read_bytes():
            differs.append(name)
    got, want = open_cube(store), open_cube(reference / "cube.zarr")
    for name in ("dh_m", "valid"):
        if not got[name].load().drop_attrs().identical(want[name].load().drop_attrs()):
            differs.append(name)
    stats = xr.open_zarr(store, group="stats").load().drop_attrs()
    if not stats.identical(
        xr.open_zarr(reference / "cube.zarr", group="stats").load().drop_attrs()
    ):
        differs.append("stats")
    if not verify(store).ok:
        differs.append("verify")
    return differs


def set_outlier_nmad(study: Path, value: float | None) -> None:
    path = study / "study.yaml"
    config = yaml.safe_load(path.read_text()) or {}
    corrections = config.setdefault("corrections", {})
    if value is None:
        corrections.pop("outlier_nmad", None)
    else:
        corrections["outlier_nmad"] = value
    path.write_text(yaml.safe_dump(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mbcube-kill-random"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    study = generate_study(
        work / "study", "tiny", size_px=256, n_glaciers=8, n_scenes=4, kind="mixed", seed=3
    )
    reference = work / "reference"
    full_s = run_to_end(study, reference / "cube.zarr", reference / "results")
    print(f"uninterrupted run: {full_s:.1f} s", flush=True)
    runs = kills = identical = 0
    rows = []
    for trial in range(args.trials):
        where = work / f"trial{trial}"
        store, out = where / "cube.zarr", where / "results"
        revert = trial % 2 == 1
        if revert:
            set_outlier_nmad(study, 1.5)
        delays = []
        for _ in range(int(rng.integers(1, MAX_KILLS + 1))):
            delay = float(rng.uniform(0.0, full_s))
            proc = mbcube_run(study, store, out)
            runs += 1
            try:
                proc.wait(timeout=delay)  # finished before its kill time: the store is complete
                delays.append(f"{delay:.1f} (finished first)")
                break
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                delays.append(f"{delay:.1f}")
        if revert:
            set_outlier_nmad(study, None)
        run_to_end(study, store, out)
        runs += 1
        differs = same_result(store, out, reference)
        identical += not differs
        rows.append((trial, revert, delays, differs))
        killed = ", ".join(delays)
        verdict = "identical" if not differs else "DIFFERS in " + ", ".join(differs)
        reverted = " (param reverted)" if revert else ""
        print(f"trial {trial}: killed at {killed} s{reverted}: {verdict}", flush=True)
        shutil.rmtree(where)
    summary = (
        f"\n## {dt.datetime.now():%Y-%m-%d %H:%M} randomized kills (seed {args.seed})\n\n"
        f"Study: 256 x 256 px, 8 glaciers, 4 scenes (insar and dem), uninterrupted run "
        f"{full_s:.1f} s. {args.trials} trials, {runs} `mbcube run` processes, {kills} of them "
        f"SIGKILLed at uniform random times in [0, {full_s:.1f}] s; in half the trials the killed "
        f"runs had outlier_nmad 1.5, reverted for the last run. "
        f"**{identical} of {args.trials} trials identical** to the uninterrupted run (tables byte "
        f"for byte, dh_m, valid, stats, `mbcube verify` clean).\n\n"
        "| trial | reverted | kill delays (s) | result |\n|---|---|---|---|\n"
        + "".join(
            f"| {t} | {'yes' if r else 'no'} | {', '.join(ds)} | "
            f"{'identical' if not diff else 'differs: ' + ', '.join(diff)} |\n"
            for t, r, ds, diff in rows
        )
    )
    with open(RESULTS, "a") as f:
        f.write(summary)
    print(summary)
    if identical != args.trials:
        sys.exit(1)


if __name__ == "__main__":
    main()
