"""hotdog-ray: train, track and serve convolutional image classifiers on Ray.

The import rule, once for the whole package: every import stands at the top of its module, so the
dependency graph reads from the file tops, and layers only import downward. torch, torchvision,
Ray, MLflow, ONNX and ONNX Runtime are imported only by the modules that need them (the allow-list
in ``pyproject.toml``, enforced by ruff): ``config``, ``registry``, ``tracking``, ``storage``,
``images``, the CLI's parser and the scoring actor load no torch (``tests/test_imports.py``). The
few imports inside functions say why in their ``noqa``. Classes are defined at module level, never
inside functions.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotdog-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
