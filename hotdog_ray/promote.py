"""Promotion: move the registry alias (``tracking.alias``, default ``champion``) to a new model
only when it beats the current one on the same test data.

Serving and scoring load ``models:/<registered_model>@<alias>``, so this is the one gate
between a sweep and production traffic.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hotdog_ray import model_store, registry, rollout
from hotdog_ray.evaluate import evaluate_model

if TYPE_CHECKING:
    from hotdog_ray.config import Config
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Decision:
    """What promotion did and why; logged as ``promotion.json`` on the sweep's run."""

    promoted: bool
    reason: str
    metric: str
    candidate: str
    candidate_score: float | None = None
    champion_version: str | None = None
    champion_score: float | None = None
    version: str | None = None  # the alias's version afterwards

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(metric: str, candidate: float, champion: float | None) -> tuple[bool, str]:
    """Promote only a strict improvement (pure; ties keep the champion, which is already serving)."""
    if champion is None:
        return True, f"no current champion; candidate {metric} {candidate:.4f}"
    if candidate > champion:
        return True, f"candidate {metric} {candidate:.4f} beats champion {champion:.4f}"
    return False, f"candidate {metric} {candidate:.4f} does not beat champion {champion:.4f}"


def promote(
    cfg: "Config", run_id: str, *, data_root: str | None = None, record: "Run | None" = None
) -> Decision:
    """Evaluate the model logged by ``run_id`` and the current champion on the test split of
    ``data_root`` (default ``data.root``); register the candidate and move the alias only if it wins.

    The comparison is recorded on ``record`` (a sweep's run) when given.
    """
    tracking, metric = cfg.tracking, cfg.tune.promote_metric
    candidate = model_store.load_model(tracking, f"runs:/{run_id}")
    cand_score = float(evaluate_model(cfg, candidate, root=data_root)[metric])
    champ_version = registry.alias_version(tracking)
    scores = {"metric": metric, "candidate": run_id, "candidate_score": cand_score}
    scores |= {"champion_version": champ_version, "version": champ_version}
    champ_score = None
    if champ_version is not None:
        if registry.version_run_id(tracking, champ_version) == run_id:
            reason = "the candidate already is the champion"
            return _record(
                record, Decision(promoted=False, reason=reason, champion_score=cand_score, **scores)
            )
        champion = model_store.load_model(tracking, f"models:/{tracking.registered_model}/{champ_version}")
        if champion.classes != candidate.classes:
            reason = (
                f"champion version {champ_version} predicts other classes ({champion.classes}); "
                "not comparable, use `hotdog promote --force VERSION`"
            )
            return _record(record, Decision(promoted=False, reason=reason, **scores))
        champ_score = float(evaluate_model(cfg, champion, root=data_root)[metric])
    promoted, reason = decide(metric, cand_score, champ_score)
    if promoted:
        scores["version"] = model_store.register(tracking, run_id)
        registry.set_alias(tracking, scores["version"])
    log.info("promotion: %s (%s)", "promoted" if promoted else "kept the champion", reason)
    return _record(record, Decision(promoted=promoted, reason=reason, champion_score=champ_score, **scores))


def force(cfg: "Config", version: str) -> Decision:
    """Point the alias at ``version`` without evaluating: for humans (rollbacks, hotfixes). With
    ``rollout.min_requests`` or ``rollout.min_agreement`` set, only once the version's shadow figures
    against the current champion meet them. A version registered before ONNX export existed is
    exported first (its ``onnx`` tag says how it went)."""
    before = registry.alias_version(cfg.tracking)
    which = {"metric": cfg.tune.promote_metric, "candidate": f"version {version}", "champion_version": before}
    r = cfg.rollout
    if before is not None and before != version and (r.min_requests or r.min_agreement):
        allowed, why = rollout.gate(cfg, rollout.report(cfg, before, version))
        if not allowed:
            log.warning("promotion of version %s refused: %s", version, why)
            reason = f"refused: {why} (version {version} against champion {before}, rollout.store {r.store})"
            return Decision(promoted=False, reason=reason, version=before, **which)
    model_store.ensure_version_exported(cfg.tracking, version)
    registry.set_alias(cfg.tracking, version)
    return Decision(
        promoted=True, reason=f"forced by a human (was version {before})", version=version, **which
    )


def set_challenger(cfg: "Config", version: str | None) -> str | None:
    """Point ``tracking.challenger_alias`` at ``version`` (exported first, as for the champion), or
    remove it with None; replicas with ``rollout.mode`` set pick it up at their next reload poll."""
    alias = cfg.tracking.challenger_alias
    if version is None:
        registry.delete_alias(cfg.tracking, alias)
        return None
    model_store.ensure_version_exported(cfg.tracking, version)
    registry.set_alias(cfg.tracking, version, alias)
    return version


def _record(run: "Run | None", decision: Decision) -> Decision:
    if run is not None:
        run.log_dict(decision.as_dict(), "promotion.json")
        run.set_tags(
            {
                "promotion": "promoted" if decision.promoted else "kept",
                "promotion_reason": decision.reason[:500],
            }
        )
    return decision
