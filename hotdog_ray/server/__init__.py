"""Online predictions: a FastAPI app, served by Ray Serve with dynamic batching and hot reload.

One module per concern: :mod:`~hotdog_ray.server.service` holds the model (and a rollout's
challenger) and reloads it; :mod:`~hotdog_ray.server.batching` groups requests into forward passes;
:mod:`~hotdog_ray.server.context` is what the routes reach; :mod:`~hotdog_ray.server.http`,
:mod:`~hotdog_ray.server.schema` and :mod:`~hotdog_ray.server.routes` are the HTTP side, which knows
nothing of Ray, so the same routes also run in one plain uvicorn process (``bench/serve.py``'s
baseline); :mod:`~hotdog_ray.server.replica` is the Serve ingress and
:mod:`~hotdog_ray.server.launch` starts it (``hotdog serve``, and ``build_app``, the import path of
``serving/serve_config.yaml``), after :mod:`~hotdog_ray.server.preflight`'s checks.

Hot reload: every ``serve.reload_interval_s`` a replica resolves its model reference (the
registry alias by default) and, when it names another version, loads it beside the old one and
swaps. A request holds the model it started with, so requests in flight finish on the old one
and none fails during the switch. A ``user_config`` change (``serve deploy`` with a new
``reload_token`` or ``model_uri``) reloads at once.
"""
