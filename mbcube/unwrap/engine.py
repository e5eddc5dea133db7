"""Unwrapping engines behind one call. Each engine unwraps one block (a tile with its halo or
a whole scene) of wrapped phase given coherence, a valid mask and the number of looks.

- ``snaphu``: SNAPHU 2.0.7 (the `snaphu` package), statistical-cost minimum-cost flow with
  cost="smooth" (topographic residuals are smooth) and init="mst" (7-16x faster than "mcf" at
  the same accuracy on our scenes). Uses coherence and nlooks, so low-coherence glacier pixels
  cost little to cut; about 100 bytes per pixel of memory.

scikit-image's `unwrap_phase` was tried and rejected: it ignores coherence and made clustered
cycle errors on low-coherence glaciers.
"""

from __future__ import annotations

import subprocess
import types
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

EngineName = Literal["snaphu"]

#: An engine: (wrapped phase rad, coherence, valid bool mask, nlooks) -> unwrapped phase (rad),
#: congruent to the input modulo 2 pi on valid pixels.
Engine = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def _silence_snaphu_stdout() -> None:
    """SNAPHU prints ~20 lines per run to the inherited stdout, which would bury the progress
    bar. The `snaphu` package runs it with `subprocess.run(..., stderr=PIPE)` (stderr already
    goes into its error messages); route its stdout to /dev/null too. Only the `snaphu`
    package's module is touched, and only if it looks as expected; otherwise output stays."""
    try:
        from snaphu import _snaphu
    except ImportError:  # pragma: no cover - snaphu is a dependency
        return
    if getattr(_snaphu, "subprocess", None) is not subprocess:
        return

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        return subprocess.run(*args, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in subprocess.__all__})
    shim.run = run
    _snaphu.subprocess = shim  # type: ignore[assignment]


def snaphu_engine(
    phase_rad: np.ndarray, coherence: np.ndarray, valid: np.ndarray, nlooks: float
) -> np.ndarray:
    """Unwrap with SNAPHU (cost='smooth', init='mst'); masked pixels are ignored (rad)."""
    import snaphu

    _silence_snaphu_stdout()
    igram = np.exp(1j * np.where(valid, phase_rad, 0.0)).astype(np.complex64)
    corr = np.where(valid, coherence, 0.0).astype(np.float32)
    unw, _ = snaphu.unwrap(
        igram, corr, nlooks=float(nlooks), cost="smooth", init="mst", mask=valid.astype(np.bool_)
    )
    return np.asarray(unw, dtype=np.float32)


#: Engines by name. Looked up at call time, so tests can wrap an engine to count its calls.
ENGINES: dict[str, Engine] = {"snaphu": snaphu_engine}


def run_engine(
    name: str, phase_rad: np.ndarray, coherence: np.ndarray, valid: np.ndarray, nlooks: float
) -> np.ndarray:
    """Unwrapped phase (rad, float32) of one block with engine `name` (see the module doc)."""
    try:
        engine = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown unwrap engine {name!r}; known: {sorted(ENGINES)}") from None
    if min(phase_rad.shape) < 2:
        raise ValueError(f"a block of {phase_rad.shape} px is too small to unwrap (need 2 x 2)")
    return engine(phase_rad, coherence, valid, nlooks)
