"""``hotdog promote`` and ``rollout``: which model serves, and a challenger's figures beside it."""

from __future__ import annotations

import argparse
import json
import logging

from hotdog_ray import feedback, feedback_loop, gate, model_store, promote, registry, retrain, rollout
from hotdog_ray.cli.common import config_from_args
from hotdog_ray.errors import ModelError
from hotdog_ray.score import run_date

log = logging.getLogger("hotdog_ray")


def cmd_promote(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    if args.challenger or args.clear_challenger:
        version = promote.set_challenger(cfg, None if args.clear_challenger else args.challenger)
        name, alias = cfg.tracking.registered_model, cfg.tracking.challenger_alias
        print(f"{name}@{alias} is version {version}" if version else f"{name}@{alias} removed")
        return 0
    if args.force:
        decision = promote.force(cfg, args.force)
    else:
        decision = promote.promote(cfg, args.run, data_root=args.data)
    print(
        json.dumps(decision.as_dict(), indent=2)
        if args.json
        else f"{'promoted' if decision.promoted else 'kept the champion'}: {decision.reason}; "
        f"{cfg.tracking.registered_model}@{cfg.tracking.alias} is version {decision.version}"
    )
    return 0


GATE_FAILED = 4  # the exit status of a candidate the gate refuses


def cmd_feedback(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    t = cfg.tracking
    version = registry.alias_version(t)
    if version is None:
        raise ModelError(
            f"{t.registered_model} has no {t.alias!r} version: its classes name the export's folders"
        )
    classes = model_store.load_model(t, f"models:/{t.registered_model}/{version}").classes
    summary = feedback.export(cfg, classes)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.line())
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:

    outcome = retrain.retrain(config_from_args(args), force=args.force)
    if args.json:
        print(json.dumps(outcome.to_dict(), indent=2))
    elif outcome.retrained:
        print(
            f"retrained version {outcome.champion} ({outcome.reason}): version {outcome.candidate} "
            "is the challenger; hotdog gate judges it"
        )
    else:
        print(outcome.reason)
    return 0


def cmd_loop(args: argparse.Namespace) -> int:

    outcome = feedback_loop.run_loop(config_from_args(args), force=args.force, data_root=args.data)
    print(json.dumps(outcome.to_dict(), indent=2) if args.json else outcome.line())
    return 0


def cmd_gate(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    report = gate.run_gate(cfg, args.version, data_root=args.data)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.passed else GATE_FAILED


def cmd_rollout(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    t = cfg.tracking
    champion, challenger = registry.alias_version(t), registry.alias_version(t, t.challenger_alias)
    if champion is None or challenger is None:
        raise ModelError(
            f"{t.registered_model} needs both aliases {t.alias!r} and {t.challenger_alias!r} for a rollout "
            f"(champion: {champion}, challenger: {challenger}); see hotdog promote --challenger"
        )
    # The replicas' own running figures, unless a period is asked for: that comes from the
    # prediction log, which also gives each version's accuracy where feedback came in.
    accuracy = None
    if args.since or cfg.prediction_log.location:
        since = run_date(args.since).isoformat() if args.since else None
        from_log, accuracy = rollout.from_prediction_log(cfg, champion, challenger, since)
    stats = from_log if args.since else rollout.report(cfg, champion, challenger)
    allowed, why = rollout.gate(cfg, stats)
    out = {
        "champion": champion,
        "challenger": challenger,
        "since": args.since,
        **stats.summary(),
        "accuracy": accuracy,
        "promotable": allowed,
        "why": why,
        "gate": gate.recorded(cfg, challenger),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{t.registered_model}: champion version {champion}, challenger version {challenger}")
    print(
        f"  requests {out['requests']} (champion {out['served_by_champion']}, challenger "
        f"{out['served_by_challenger']}), shadowed {out['shadowed']}, agreement {fmt(out['agreement'], '.3f')}"
    )
    for role in rollout.ROLES:
        labelled = (
            f", accuracy {fmt(accuracy[role]['accuracy'], '.3f')} on {accuracy[role]['labelled']} labelled"
            if accuracy
            else ""
        )
        print(
            f"  {role:<11} p50 latency {fmt(out['p50_latency_ms'][role], '.2f')} ms, "
            f"median confidence {fmt(out['median_confidence'][role], '.3f')}{labelled}"
        )
    print(f"  {'promotable' if allowed else 'not promotable'}: {why}")
    recorded = out["gate"]
    if recorded:
        print(
            f"  gate: {recorded.get(gate.GATE_TAG)} against champion version {recorded.get(gate.CHAMPION_TAG)}: "
            f"{recorded.get(gate.REASONS_TAG)}"
        )
    else:
        print(f"  gate: not run for version {challenger} (hotdog gate {challenger})")
    return 0
