"""The tables bench/throughput.py prints (after a run, or again from a saved --out file with --report)."""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import median, ratios, side_by_side


def report(res: dict[str, list[dict[str, Any]]], a: argparse.Namespace) -> str:
    """The tables of a run: every arm, the ratios of the pairs it holds, stages and busy shares, objectives."""
    lines = []

    def med(arm: str, key: str) -> float:
        return median([r[key] for r in res.get(arm, []) if r.get(key) is not None])

    def cell(arm: str, key: str, digits: int) -> str:
        value = med(arm, key)
        return "" if value != value else f"{value:.{digits}f}"

    lines.append(
        "| arm | completion tok/s (median) | per repeat | step (s) | peak PSS, all processes (MB) | to step 1 (s) "
        "| median step (s) | driver peak RSS (MB) |"
    )
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for arm in a.arms:
        if arm.startswith("stages") or arm not in res:
            continue
        per = " / ".join(f"{r['tok_per_s']:.0f}" for r in res[arm])
        cells = [cell(arm, "tok_per_s", 0), per, cell(arm, "step_s", 2), cell(arm, "peak_pss_mb", 0)]
        cells += [cell(arm, "to_step1_s", 0), cell(arm, "step_median_s", 2), cell(arm, "driver_peak_rss_mb", 0)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    pairs = [
        ("service", "loop"),
        ("service-a0", "loop-a0"),
        ("service", "trl"),
        ("service-a0", "trl"),
        ("loop-a0", "trl"),
        ("service-a0", "service"),
    ]
    header = len(lines)
    revs = [arm for arm in a.arms if "@" in arm]
    pairs += [("service-ppo", "service")] + [(y, x) for x, y in zip(revs, revs[1:], strict=False)]
    keys = {"tok/s": "tok_per_s", "peak PSS": "peak_pss_mb", "step (s)": "step_s", "median step (s)": "step_median_s"}
    keys["driver peak RSS"] = "driver_peak_rss_mb"
    for x, y in pairs:
        if x not in res or y not in res:
            continue
        shown = ["tok/s"] + (["peak PSS"] if y == "trl" else [])
        shown += ["step (s)"] if x == "service-ppo" else ["median step (s)", "driver peak RSS"] if "@" in x else []
        for name in shown:
            rs = ratios(res, x, y, keys[name])
            lines.append(f"| {x} / {y}, {name} | {' / '.join(f'{r:.2f}' for r in rs)} | {median(rs):.2f} |")
    if len(lines) > header:  # the ratio table only when the run holds one of its pairs
        lines[header:header] = ["", "| ratio | per repeat | median |", "|---|---|---:|"]
    for svc, stg in (("service", "stages"), ("service-a0", "stages-a0")):
        if svc not in res or stg not in res:
            continue
        lines += ["", f"{svc}: stages alone ({stg}) and busy shares in the service", ""]
        lines.append(
            "| stage | alone: s per batch (median) | alone: tok/s | in the service: wall s per batch "
            "| in the service: CPU s per batch | busy share of a service step |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        shares = {k: median([r["busy_share"][k] for r in res[svc]]) for k in res[svc][0]["busy_share"]}
        walls = {k: median([r["busy_per_batch_s"][k] for r in res[svc]]) for k in res[svc][0]["busy_per_batch_s"]}
        cpus = {k: median([r["cpu_per_batch_s"][k] for r in res[svc]]) for k in res[svc][0]["cpu_per_batch_s"]}
        # push: alone = gather the learner's weights + load them into the sampler; in the service the driver's
        # push_seconds (the dispatch of the push; the load happens in the sampler between batches)
        names = {"sample": "sampler", "score": "teacher", "update": "learner", "push": "push (driver)"}
        for k, label in names.items():
            s = median([r["stage_s"][k] for r in res[stg]])
            rate = median([r["stage_tok_per_s"][k] for r in res[stg]])
            cpu = f"{cpus[label]:.2f}" if label in cpus else ""
            lines.append(
                f"| {label} | {s:.2f} | {rate:.0f} | {walls.get(label, float('nan')):.2f} | {cpu} "
                f"| {shares.get(label, float('nan')):.2f} |"
            )
        lines.append(f"| learner idle (wait) | | | | | {shares['learner idle (wait)']:.2f} |")
        effs = []
        for r_svc, r_stg in side_by_side(res, svc, stg):
            slowest = min(r_stg["stage_tok_per_s"][k] for k in ("sample", "score", "update"))
            effs.append(r_svc["tok_per_s"] / slowest)
        lines.append(
            f"\npipeline efficiency ({svc} tok/s / slowest stage alone): "
            f"{' / '.join(f'{e:.2f}' for e in effs)} (median {median(effs):.2f})"
        )
    for arm in ("loop", "loop-a0"):
        if arm in res:
            sh = {k: median([r["busy_share"][k] for r in res[arm]]) for k in ("sample", "score", "update")}
            lines.append(f"\n{arm}: share of its step: " + ", ".join(f"{k} {v:.2f}" for k, v in sh.items()))
    lines += objective_table(res, a.arms)
    return "\n".join(lines)


def objective_table(res: dict[str, list[dict[str, Any]]], arms: list[str]) -> list[str]:
    """Per objective arm (`service:SPEC`, and each base arm they share): medians over repeats of completion tok/s,
    the learner's step seconds and the teacher's payload bytes per response token, each beside its per-repeat ratio
    to the base arm (the same run configuration with the default objective)."""
    shown = [x for x in arms if x in res and ":" in x]
    bases = list(dict.fromkeys(x.split(":")[0] for x in shown))
    if not shown:
        return []
    keys = (("tok_per_s", 0), ("learner_step_s", 3), ("teacher_bytes_per_token", 0))
    lines = ["", "Objectives (ratio: the arm / its base arm with the default objective, repeat by repeat; median)", ""]
    lines.append(
        "| arm | completion tok/s | ratio | learner step (s, median) | ratio | teacher bytes / token: rollouts "
        "| ratio | + pre-training block (lmops) |"
    )
    lines.append("|---|---:|---|---:|---|---:|---|---:|")
    for arm in [x for x in arms if x in bases and x in res] + shown:
        base = arm.split(":")[0]
        cells = []
        for key, digits in keys:
            value = median([r[key] for r in res[arm] if r.get(key) is not None])
            cells.append("" if value != value else f"{value:,.{digits}f}")
            pairs = side_by_side(res, arm, base) if arm != base else []
            rs = [x[key] / y[key] if y.get(key) else float("nan") for x, y in pairs if x.get(key) is not None]
            finite = [r for r in rs if r == r]
            cells.append(f"{' / '.join(f'{r:.2f}' for r in rs)} (median {median(finite):.2f})" if finite else "")
        pt = median([r.get("pt_teacher_bytes_per_token", 0.0) for r in res[arm]])
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {pt:,.0f} |")
    return lines
