"""The baseline of bench/serve.py: our FastAPI handlers in one uvicorn process, no Ray.

A direct forward pass per request, as a user would write without a serving framework.
Started by bench/serve.py as ``uvicorn --factory serve_baseline:app``; the config comes from
HOTDOG_BENCH_CONFIG, HOTDOG_BENCH_SET (one override per line) and HOTDOG_BENCH_MODEL.
"""

from __future__ import annotations

import os


def app():
    from hotdog_ray.config import load_config
    from hotdog_ray.server.app import create_api, direct_infer
    from hotdog_ray.server.context import ServerContext
    from hotdog_ray.server.service import ModelService

    overrides = [s for s in os.environ.get("HOTDOG_BENCH_SET", "").splitlines() if s]
    cfg = load_config(os.environ.get("HOTDOG_BENCH_CONFIG") or None, overrides)
    service = ModelService(cfg, os.environ["HOTDOG_BENCH_MODEL"])
    service.refresh()
    return create_api(ServerContext.create(service, cfg.serve, cfg.prediction_log, cfg.data, direct_infer))
