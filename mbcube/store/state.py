"""The store-level state: schema version, grid, the study's location and parameters.

Kept as JSON in the root attribute `mbcube` of the cube's `zarr.json` (small, fixed size: what
every reader needs). What each step did per scene lives in the `records` group
(`mbcube.store.records`), not here, so that this document does not grow with the scenes.
xarray replaces root attributes on every write, so all writes go through
`mbcube.store.cube.write_dataset`, which carries them along.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mbcube.config import StudyConfig
from mbcube.errors import StoreError
from mbcube.grid import Grid

#: Version of the cube's layout; a cube of another version is refused with the fix.
SCHEMA_VERSION = 2
STATE_ATTR = "mbcube"
#: The last root zarr.json parsed, under its (path, inode, size, mtime) key (every rewrite is a
#: new file renamed into place: a new inode).
_PARSED: dict[str, Any] = {}


def store_exists(path: Path) -> bool:
    """A Zarr group is at `path` (an mbcube cube or not)."""
    return (Path(path) / "zarr.json").exists()


def is_cube(path: Path) -> bool:
    """`path` holds a cube made by mbcube (of any schema version)."""
    try:
        return bool(read_state(Path(path)))
    except StoreError:
        return False


def read_state(path: Path) -> dict[str, Any]:
    """The store's recorded state ({} for a Zarr group mbcube did not make).

    Read straight from the root `zarr.json` (a few ms, where opening the group through zarr
    takes ~70 ms: steps read it several times per scene)."""
    raw = root_metadata(Path(path), cached=True).get("attributes", {}).get(STATE_ATTR)
    return json.loads(raw) if isinstance(raw, str) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the recorded state: the root `zarr.json` is rewritten to a temporary file, flushed
    to disk and renamed over the old one, so a kill at any moment leaves the old or the new
    state, never a torn file. (Only the process holding the store's lock writes it.)"""
    target = Path(path) / "zarr.json"
    meta = root_metadata(Path(path))
    meta.setdefault("attributes", {})[STATE_ATTR] = json.dumps(state, sort_keys=True)
    tmp = target.with_name(f".zarr.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def root_metadata(path: Path, *, cached: bool = False) -> dict[str, Any]:
    """The root `zarr.json` of the store at `path`, parsed. `cached`: the parse kept while the
    file's size and modification time stay the same (it holds the consolidated metadata of every
    node and is read several times per command); the caller must not change it."""
    target = path / "zarr.json"
    try:
        stat = target.stat()
        key = (str(target.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if not cached or _PARSED.get("key") != key:
            meta = json.loads(target.read_bytes())
            if cached:
                _PARSED.update(key=key, meta=meta)
        else:
            meta = _PARSED["meta"]
    except FileNotFoundError as err:
        raise StoreError(f"{path}: no cube here (no zarr.json).") from err
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{path}/zarr.json: not valid JSON ({err}): the store's root metadata is damaged."
        ) from err
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise StoreError(f"{path}: not a Zarr v3 group (zarr.json says {meta.get('zarr_format')}).")
    return dict(meta)


def check_schema(path: Path, state: dict[str, Any]) -> None:
    """Refuse a store of another schema version (or not made by mbcube), naming the fix."""
    version = state.get("schema_version")
    if version != SCHEMA_VERSION:
        made = "not made by mbcube" if not state else f"cube schema version {version!r}"
        raise StoreError(
            f"{path}: {made}; this mbcube reads schema {SCHEMA_VERSION}. "
            "Ingest the study into a new store (--store NEW)."
        )


def recorded_config(path: Path) -> StudyConfig:
    """The study parameters recorded in the store at ingest (or since updated)."""
    return StudyConfig.model_validate(read_state(path)["study"]["config"])


def grid_of(state: dict[str, Any]) -> Grid:
    return Grid.from_attrs(state["grid"])
