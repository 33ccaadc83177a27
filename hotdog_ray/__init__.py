"""hotdog-ray: train, track and serve convolutional image classifiers on Ray.

The import rule, once for the whole package: a module imports at its top what every caller of it
needs anyway, and imports torch, Ray, MLflow or Serve inside functions when a lighter caller uses
it too: ``cli`` (``hotdog --help`` must not load them), ``errors``, ``config``, ``storage`` and
``images`` (Ray Data decoding tasks start faster without torch), ``registry`` and ``tracking``
(MLflow only when a store is touched). ``train`` and ``serve`` import Ray at their top: they run
only where Ray does. Classes are always defined at module level, never inside functions.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotdog-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
