"""The `mbcube` command (thin: parses arguments, calls library functions, prints)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from mbcube.errors import StoreError, StudyError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Glacier mass balance from InSAR and DEM scenes.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the study into.")],
    preset: Annotated[str, typer.Option(help="tiny | demo | large")] = "tiny",
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
    """Ingest a study into its cube (create, append new scenes, or complete an interrupted run)."""
    from mbcube.ingest import ingest as run_ingest

    _setup_logging(quiet)
    try:
        report = run_ingest(study, store)
    except (StudyError, StoreError) as err:
        _fail(err)
    typer.echo(
        f"{store}: {len(report.written)} scene(s) written, {len(report.resumed)} completed, "
        f"{len(report.skipped)} up to date"
    )


@app.command()
def info(store: Annotated[Path, typer.Argument(help="Cube store.")]) -> None:
    """Print the cube's grid, scenes, coverage and size on disk."""
    from mbcube.summary import cube_summary

    try:
        typer.echo(cube_summary(store))
    except StoreError as err:
        _fail(err)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo study and its cube.")] = Path(
        "stores/demo"
    ),
    quiet: Quiet = False,
) -> None:
    """Generate the built-in synthetic demo study (if missing) and run the pipeline on it."""
    from mbcube.ingest import ingest as run_ingest
    from mbcube.summary import cube_summary
    from mbcube.synth import generate_study

    _setup_logging(quiet)
    study = out / "study"
    if not (study / "scenes.csv").exists():
        typer.echo(f"generating the demo study in {study} ...")
        generate_study(study, "demo")
    store = out / "cube.zarr"
    run_ingest(study, store)
    typer.echo(cube_summary(store))


if __name__ == "__main__":  # pragma: no cover
    app()
