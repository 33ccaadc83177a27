"""hotdog-ray: train, track and serve convolutional image classifiers on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotdog-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
