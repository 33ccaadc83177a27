"""API keys: the ones a deployment accepts (``serve.api_keys_env``), and the constant-time check."""

from __future__ import annotations

import hmac
import os
import re

from hotdog_ray.errors import ConfigError


def api_keys(env_name: str | None) -> list[bytes] | None:
    """The keys in the variable ``env_name`` names (None: the endpoints are open). A named variable
    that is unset or empty is an error: a misconfigured deployment must not open up."""
    if env_name is None:
        return None
    keys = [k.encode() for k in re.split(r"[\s,]+", os.environ.get(env_name, "")) if k]
    if not keys:
        raise ConfigError(
            f"serve.api_keys_env names {env_name}, which holds no key in this process's environment "
            "(on a cluster: set it on every node, e.g. from a Kubernetes Secret)"
        )
    return keys


def key_matches(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, comparing with every key in constant time."""
    candidate = given.encode()
    return sum(hmac.compare_digest(candidate, k) for k in keys) > 0
