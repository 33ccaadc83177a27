"""Every error a user can fix, under one base class.

The CLI turns any :class:`HotdogError` into one line on stderr and exit code 2; anything else is
a bug and keeps its traceback. Each class also derives from the built-in type callers caught
before this hierarchy existed, so ``except ValueError`` around a config load still works.
This module imports nothing, so any module (and ``hotdog --help``) can use it for free.
"""

from __future__ import annotations


class HotdogError(Exception):
    """Base class: something the user can fix; the message says what and where."""


class ConfigError(HotdogError, ValueError):
    """A config file or override is invalid; the message names the key."""


class StorageError(HotdogError, RuntimeError):
    """A URI cannot be used: missing bucket, prefix or credentials. The message says which."""


class DataError(HotdogError, ValueError):
    """The dataset layout is unusable (missing or empty split, a single class, unknown class)."""


class ImageError(HotdogError, ValueError):
    """Bytes that are not a usable image; the message is safe to show to an API client."""


class PrepareError(HotdogError, ValueError):
    """The source does not have the layout it was said to have."""


class TrainingError(HotdogError, RuntimeError):
    """Training stopped and cannot go on by itself (diverged, or out of retries)."""


class TrackingError(HotdogError, RuntimeError):
    """The MLflow store cannot be used: unreachable, or its URI names no store MLflow knows."""


class ModelError(HotdogError, LookupError):
    """A model reference that names no model in the tracking store, or a bundle that cannot load."""


class SweepError(HotdogError, RuntimeError):
    """A sweep that cannot start or produced no usable trial; the message says why."""


class ScoreError(HotdogError, RuntimeError):
    """The scoring run cannot start or did not account for every input; nothing was published."""
