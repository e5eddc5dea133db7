"""mbcube: glacier mass balance from InSAR and DEM scenes, as a lazy Zarr datacube."""

from importlib.metadata import PackageNotFoundError, version

from mbcube.errors import MbcubeWarning, StudyError

try:
    __version__ = version("mbcube")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

from mbcube import accessor as _accessor  # noqa: F401  (registers ds.mb)

__all__ = ["MbcubeWarning", "StudyError", "__version__"]
