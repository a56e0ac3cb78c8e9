import importlib.metadata

import quantrt
from quantrt.version import __version__, distribution_version


def test_the_version_is_the_installed_distributions():
    assert quantrt.__version__ == __version__ == importlib.metadata.version("quantrt")


def test_distribution_versions():
    assert distribution_version("torch") == importlib.metadata.version("torch")
    assert distribution_version("no-such-distribution-quantrt-test") is None
