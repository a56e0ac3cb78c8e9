"""quantrt's version (the installed distribution's, or a marker when running from an uninstalled source tree), and
any installed distribution's."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quantrt")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"


def distribution_version(name: str) -> str | None:
    """The installed version of the distribution `name` ("optimum-quanto"), or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


__all__ = ["__version__", "distribution_version"]
