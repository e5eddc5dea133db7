"""Where dask work runs: cluster profiles, the client, and computing with a progress bar.

`distributed` and `dask_jobqueue` are imported only in this module.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask

#: When True, `compute` shows no progress bar (scripts, `--quiet`).
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("mbcube_quiet", default=False)


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Inside the block, `compute` draws no progress bar."""
    token = _QUIET.set(enabled)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _active_client() -> Any | None:
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(*collections: Any, label: str) -> tuple[Any, ...]:
    """`dask.compute(*collections)` in the active scheduler, with a progress bar of tasks done /
    total labelled `label` (e.g. 'unwrap scene T1'), unless `quiet()` is active.

    With a distributed client the bar is distributed's and the dashboard link is printed once."""
    client = _active_client()
    if _QUIET.get():
        return dask.compute(*collections)
    if client is None:
        from dask.diagnostics import ProgressBar

        print(label, flush=True)
        with ProgressBar(minimum=1.0, dt=0.5):
            return dask.compute(*collections)
    from distributed import progress

    print(f"{label} (dashboard: {client.dashboard_link})", flush=True)
    futures = client.compute(list(collections))
    progress(futures)
    return tuple(client.gather(futures))
