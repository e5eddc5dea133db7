"""The `mbcube` command (thin: parses arguments, calls library functions, prints).

Every expected failure (bad input, a locked, damaged, read-only or full store) prints one line
per problem, naming the file, row or field and the fix, and exits with code 2; `--debug`
shows the traceback instead. Warnings print as one line without source paths."""

from __future__ import annotations

import errno
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from mbcube.errors import StoreError, StudyError, is_damage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Glacier mass balance from InSAR and DEM scenes.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]

#: Set by --debug: errors raise with their traceback instead of one line each.
_DEBUG = {"on": False}


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error (for a bug report).")
    ] = False,
) -> None:
    _DEBUG["on"] = debug
    if not debug:
        warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning: {message}\n"


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    import dask

    # distributed sets its loggers from this key when it is first imported (in mbcube.cluster)
    dask.config.set({"logging.distributed": "warning"})
    for chatty in ("distributed", "dask_jobqueue", "numba", "rasterio", "pyogrio"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


#: File system refusals printed as one line: errno -> (what happened, the fix).
_OS_ERRORS = {
    errno.ENOSPC: ("disk full", "free space there and run again: the run resumes where it stopped"),
    errno.EDQUOT: ("disk quota exceeded", "free space there and run again"),
    errno.EROFS: ("read-only file system", "give a writable --store / --out"),
    errno.EACCES: ("permission denied", "give a path you may write to"),
    errno.EPERM: ("not permitted", "give a path you may write to"),
}


def expected_error_lines(
    err: BaseException, store: Path | None = None, out: Path | None = None
) -> list[str] | None:
    """The lines to print for an expected failure, or None for a bug (shown with its
    traceback). `store`, `out`: the command's store and output folder, named when the error
    does not name its file."""
    import zarr.errors  # here: the command starts without zarr

    if isinstance(err, (StudyError, StoreError)):
        return [line for line in str(err).splitlines() if line.strip()]
    if isinstance(err, OSError) and err.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[err.errno]
        where = err.filename or " or ".join(str(p) for p in (store, out) if p) or "?"
        return [f"{where}: {what} ({err.strerror}); {fix}."]
    if isinstance(err, OSError) and err.filename and not isinstance(err, zarr.errors.BaseZarrError):
        return [f"{err.filename}: {err.strerror or err}."]
    verify = f"`mbcube verify {store}`" if store else "`mbcube verify STORE`"
    if is_damage(err) or isinstance(err, zarr.errors.BaseZarrError):
        return [
            f"the store is damaged ({type(err).__name__}: {err}); {verify} names what and "
            "repairs it."
        ]
    return None


@contextmanager
def _handled(store: Path | None = None, out: Path | None = None) -> Iterator[None]:
    """Expected failures as one line each and exit code 2 (unless --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    except Exception as err:
        lines = None if _DEBUG["on"] else expected_error_lines(err, store, out)
        if lines is None:
            raise
        first, *rest = lines
        typer.echo(f"error: {first}", err=True)
        for line in rest:
            typer.echo(f"  {line.strip()}", err=True)
        raise typer.Exit(2) from None


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the study into.")],
    preset: Annotated[str, typer.Option(help="tiny | demo | tongues | large")] = "tiny",
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    kind: Annotated[str | None, typer.Option(help="insar | dem | mixed")] = None,
    scenes: Annotated[int | None, typer.Option(help="Number of scenes.")] = None,
    size: Annotated[int | None, typer.Option(help="Grid size (px per side).")] = None,
    glaciers: Annotated[int | None, typer.Option(help="Number of glaciers (target).")] = None,
) -> None:
    """Write a synthetic study with known truth (truth/ holds the answers)."""
    from mbcube.synth import PRESETS, generate_study

    if preset not in PRESETS:
        _fail(ValueError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}"))
    options = {
        "seed": seed,
        "kind": kind,
        "n_scenes": scenes,
        "size_px": size,
        "n_glaciers": glaciers,
    }
    path = generate_study(out, preset, **{k: v for k, v in options.items() if v is not None})
    typer.echo(f"synthetic study written to {path} (truth in {path / 'truth'})")


@app.command()
def ingest(
    study: Annotated[Path, typer.Argument(help="Study folder (see README: the study contract).")],
    store: Annotated[Path, typer.Option(help="Cube store (Zarr directory).")],
    quiet: Quiet = False,
) -> None:
    """Ingest a study into its cube: create it, append new scenes, complete interrupted ones,
    rewrite scenes whose row or files changed, remove scenes whose row was deleted."""
    from mbcube.ingest import ingest as run_ingest
    from mbcube.preflight import check_run

    _setup_logging(quiet)
    with _handled(store):
        report = run_ingest(check_run(study, store), store)
    typer.echo(
        f"{store}: {len(report.written)} scene(s) written, {len(report.resumed)} completed, "
        f"{len(report.changed)} rewritten (row or files changed), {len(report.removed)} "
        f"removed, {len(report.skipped)} up to date"
    )


@app.command()
def info(store: Annotated[Path, typer.Argument(help="Cube store.")]) -> None:
    """Print the cube's grid, scenes, coverage, the steps each scene went through (files a step
    recorded that are gone are marked damaged), its writer and size on disk. Takes no lock."""
    from mbcube.summary import cube_summary

    with _handled(store):
        typer.echo(cube_summary(store))


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="Cube store.")],
    repair: Annotated[
        bool,
        typer.Option(
            "--repair", help="Forget what is damaged, so that the next run redoes it (only that)."
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Only presence and sizes of the files (no chunk decoded)."),
    ] = False,
) -> None:
    """Check every file the steps recorded: present, of its size, decoding with its checksum;
    every other chunk decoding; the cached statistics equal to the stored ones. Exit code 1 when
    something is damaged (with --repair: when something cannot be repaired in place)."""
    from mbcube.verify import verify as run_verify

    with _handled(store):
        report = run_verify(store, decode=not quick, repair_it=repair)
    for line in report.lines():
        typer.echo(line)
    if report.needs_new_store or (not report.ok and not report.repaired):
        raise typer.Exit(1)


Cluster = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        envvar="MBCUBE_CLUSTER",
        help="Cluster profile: 'threads' (no cluster), 'local', 'slurm' or a profile YAML "
        "(see cluster/README.md). Default: env MBCUBE_CLUSTER, else 'local'.",
    ),
]
Store = Annotated[Path, typer.Argument(help="Cube store (Zarr directory).")]
Force = Annotated[bool, typer.Option("--force", help="Recompute even what is up to date.")]
SceneIds = Annotated[
    list[str] | None, typer.Option("--scene", help="Only this scene (repeatable).")
]


def _run_step(
    step: str, store: Path, cluster: str | None, scenes: list[str] | None, force: bool
) -> None:
    from mbcube.pipeline import STEPS, cluster_context
    from mbcube.store import open_cube
    from mbcube.store.location import writable_problem

    with _handled(store):
        open_cube(store)  # not a cube: its own one-line error
        unwritable = writable_problem(store, "the store")
        if unwritable:
            raise StoreError(unwritable)
        with cluster_context(cluster or "local"):
            done = STEPS[step](store, scenes=scenes, force=force, progress=typer.echo)
    typer.echo(f"{store}: {step}: {len(done)} scene(s) recomputed, the rest up to date")


@app.command()
def unwrap(
    store: Store, cluster: Cluster = None, scene: SceneIds = None, force: Force = False
) -> None:
    """Unwrap the insar scenes (minimum-cost flow, tiled) and write phase_unw_rad and dh_raw_m."""
    _run_step("unwrap", store, cluster, scene, force)


@app.command()
def correct(
    store: Store, cluster: Cluster = None, scene: SceneIds = None, force: Force = False
) -> None:
    """Apply datum, ramp, penetration, seasonal and outlier corrections: write dh_m."""
    _run_step("correct", store, cluster, scene, force)


@app.command(name="bin")
def bin_(
    store: Store, cluster: Cluster = None, scene: SceneIds = None, force: Force = False
) -> None:
    """Binned statistics per scene x glacier x elevation bin x surface (the `stats` group)."""
    _run_step("bin", store, cluster, scene, force)


@app.command()
def aggregate(
    store: Store,
    out: Annotated[Path, typer.Option(help="Folder for glaciers.csv and regions.csv.")] = Path(
        "results"
    ),
    regions: Annotated[
        Path | None, typer.Option(help="Region polygons (column `name`) to aggregate into.")
    ] = None,
) -> None:
    """Glacier and region tables from the stored statistics (reads no pixel).

    With --regions into a folder whose glacier tables are current, only the region tables
    (regions.csv, regions.parquet, region_members.csv) are computed and written."""
    import time

    from mbcube.aggregate import aggregate as run_aggregate
    from mbcube.aggregate import tables_record

    start = time.perf_counter()
    with _handled(store, out):
        run_aggregate(store, out, regions=regions)
    seconds = time.perf_counter() - start
    _print_results(out, quiet=False, figures=False)
    gpkg = tables_record(out).get("gpkg", "")
    if gpkg and gpkg != "written":
        typer.echo(f"glaciers.gpkg {gpkg}")
    if regions is not None:
        typer.echo(f"glacier regions in {regions.name}: {out / 'region_members.csv'}")
    typer.echo(f"aggregate: {seconds:.2f} s")


@app.command()
def run(
    source: Annotated[
        Path, typer.Argument(help="Study folder, or a pipeline YAML file (see pipelines/).")
    ],
    store: Annotated[
        Path | None, typer.Option(help="Cube store (default: beside the study).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (tables, figures, report).")
    ] = None,
    cluster: Cluster = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Every step from study to tables, figures and report; each skipped when up to date."""
    from mbcube.cluster import quiet as no_progress_bars
    from mbcube.pipeline import load_pipeline
    from mbcube.pipeline import run as run_pipeline

    _setup_logging(quiet)
    with _handled(store, out):
        pipeline = load_pipeline(source, store=store, out=out, cluster=cluster)
        say = (lambda _: None) if quiet else typer.echo
        with no_progress_bars(quiet):
            report = run_pipeline(pipeline, force=force, progress=say)
    _print_results(pipeline.out, quiet)
    if report.nothing_recomputed and not quiet:
        typer.echo("everything was up to date: nothing recomputed")


def _print_results(out: Path, quiet: bool, figures: bool = True) -> None:
    import pandas as pd

    if quiet:
        return
    table = pd.read_csv(out / "regions.csv")
    columns = [
        c
        for c in (
            "name",
            "glaciers",
            "n_glaciers",
            "area_km2",
            "mb_mwe_yr",
            "mb_sigma_mwe_yr",
            "coverage_frac",
        )
        if c in table
    ]
    typer.echo(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"tables: {out / 'glaciers.csv'}, {out / 'regions.csv'}")
    if figures:
        typer.echo(f"figures: {out / 'figures'}; report: {out / 'report.html'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo study and its cube.")] = Path(
        "stores/demo"
    ),
    cluster: Cluster = None,
    quiet: Quiet = False,
) -> None:
    """Generate the built-in synthetic demo study (if missing) and run the whole pipeline on it.
    A demo cube made by an older mbcube (another schema) is made again."""
    import shutil

    from mbcube.store import SCHEMA_VERSION, is_cube, read_state
    from mbcube.synth import generate_study

    study = out / "study"
    if not (study / "scenes.csv").exists():
        typer.echo(f"generating the demo study in {study} ...")
        generate_study(study, "demo")
    cube = out / "cube.zarr"
    if is_cube(cube) and read_state(cube).get("schema_version") != SCHEMA_VERSION:
        typer.echo(f"{cube}: made by an older mbcube; the demo cube is made again")
        shutil.rmtree(cube)
    run(
        study,
        store=cube,
        out=out / "results",
        cluster=cluster,
        force=False,
        quiet=quiet,
    )
    if not quiet:
        typer.echo(f"known truth for comparison: {study / 'truth'}")


if __name__ == "__main__":  # pragma: no cover
    app()
