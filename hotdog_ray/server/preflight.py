"""What ``hotdog serve`` checks before it starts Ray (which takes seconds): the port is free, and
there is a model to serve. Light on purpose: MLflow's client, no torch and no Ray."""

from __future__ import annotations

import logging
import os
import socket

from hotdog_ray import registry
from hotdog_ray.config import Config, ServeSettings
from hotdog_ray.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def check(cfg: Config) -> None:
    """Both checks; the port only when this process would start Ray (a running one keeps its ingress)."""
    warn_without_model(cfg)
    if not os.environ.get("RAY_ADDRESS"):
        refuse_taken_port(cfg.serve)


def refuse_taken_port(s: ServeSettings) -> None:
    """A :class:`ConfigError` naming the port when another process listens on ``serve.host:port``,
    before Ray starts (Serve would fail later, inside its controller, with a traceback)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is no owner
        try:
            probe.bind((s.host, s.port))
        except OSError as exc:
            raise ConfigError(
                f"serve.port {s.port} on {s.host} is taken ({exc.strerror}): stop what listens there "
                f"(`ss -ltnp 'sport = :{s.port}'` names it) or choose another with --set serve.port=PORT"
            ) from None


def warn_without_model(cfg: Config) -> None:
    """One warning at start when there is no model to serve yet: the service starts anyway and
    answers 503 until one is registered or promoted, which it then loads by itself."""
    try:
        registry.resolve_model_ref(
            cfg.tracking, cfg.serve.model_uri or registry.default_model_ref(cfg.tracking)
        )
    except ModelError as exc:
        log.warning(
            "no model to serve yet (%s): /predict answers 503 until one is trained or promoted "
            "(hotdog train, hotdog promote --force VERSION)",
            exc,
        )
