"""The closed loop (``hotdog loop``): retrain when the field says so, shadow the candidate, let the
gate decide, promote or reject; no person in between.

States of a candidate version::

    candidate --(challenger alias)--> challenger --(gate passes)--> champion
                                          \\--(gate fails)--> rejected (alias cleared, tagged)

Steps: :func:`hotdog_ray.retrain.retrain` (its triggers, the export, the fine-tune; it makes the
candidate the challenger), then wait until the challenger has ``loop.min_live_requests`` shadow
requests (replicas with ``rollout.mode=shadow`` score it beside the champion; they see the alias at
their next reload poll, ``serve.reload_interval_s``) or ``loop.shadow_deadline_s`` passes, then
:func:`hotdog_ray.gate.run_gate`, which records its decision on the version before anything moves.
A pass moves the champion alias to the candidate and clears the challenger; replicas swap at their
next poll, the new model loaded beside the old one (no request fails or waits on the load). A fail
clears the challenger and leaves the champion as it was.

Killed at any step and run again, the loop carries on rather than starts over: a challenger that
was retrained from the current champion is taken up at the shadow step (and judged again, with the
traffic it has had since); so there is never a second challenger (one alias), a champion without a
gate record (the record comes first), or a feedback row lost (the export only ever copies).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from hotdog_ray import gate, registry, retrain, rollout
from hotdog_ray.promote import set_challenger

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

REJECTED_TAG = "rejected"


@dataclass
class LoopOutcome:
    """Where one run of the loop left the registry."""

    state: str  # unchanged, promoted or rejected
    reason: str
    champion: str | None
    candidate: str | None = None
    retrained: bool = False
    shadow_requests: int = 0
    gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.state == "unchanged":
            return f"loop: nothing changed ({self.reason}); champion version {self.champion}"
        return (
            f"loop: version {self.candidate} {self.state} ({self.reason}) after {self.shadow_requests} "
            f"shadow requests; champion version {self.champion}"
        )


def pending_challenger(cfg: "Config", champion: str) -> str | None:
    """A challenger an earlier, interrupted loop retrained from ``champion``, or None."""
    t = cfg.tracking
    challenger = registry.alias_version(t, t.challenger_alias)
    if challenger is None:
        return None
    tags = registry.client(t).get_model_version(t.registered_model, challenger).tags
    return challenger if tags.get(retrain.FROM_TAG) == champion else None


def wait_for_shadow(
    cfg: "Config",
    champion: str,
    candidate: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Shadow requests of the pair once ``loop.min_live_requests`` came in or the deadline passed."""
    want, deadline = cfg.loop.min_live_requests, clock() + cfg.loop.shadow_deadline_s
    while True:
        seen = rollout.report(cfg, champion, candidate).shadowed
        if seen >= want or clock() >= deadline:
            if seen < want:
                log.warning("only %d of %d shadow requests by the deadline: deciding on them", seen, want)
            return seen
        log.info("version %s: %d of %d shadow requests", candidate, seen, want)
        sleep(cfg.loop.poll_interval_s)


def run_loop(cfg: "Config", *, force: bool = False, data_root: str | None = None) -> LoopOutcome:
    """One turn of the loop (see the module docstring)."""
    t = cfg.tracking
    champion = registry.alias_version(t)
    candidate = pending_challenger(cfg, champion) if champion else None
    retrained = False
    if candidate is None:
        outcome = retrain.retrain(cfg, force=force)
        if not outcome.retrained:
            return LoopOutcome(state="unchanged", reason=outcome.reason, champion=outcome.champion)
        candidate, retrained = outcome.candidate, True
    else:
        log.info("taking up challenger version %s, retrained from champion %s earlier", candidate, champion)
    shadowed = wait_for_shadow(cfg, champion, candidate)
    report = gate.run_gate(cfg, candidate, data_root=data_root)
    if report.passed:
        registry.set_alias(t, candidate)
        set_challenger(cfg, None)
        state = "promoted"
    else:
        registry.client(t).set_model_version_tag(t.registered_model, candidate, REJECTED_TAG, "true")
        set_challenger(cfg, None)
        state = "rejected"
    log.info("loop: version %s %s: %s", candidate, state, report.reason())
    return LoopOutcome(
        state=state,
        reason=report.reason(),
        champion=registry.alias_version(t),
        candidate=candidate,
        retrained=retrained,
        shadow_requests=shadowed,
        gate=report.to_dict(),
    )
