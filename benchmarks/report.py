"""The report of `benchmarks.compare`: the JSON, the Markdown tables and the chart.

Each scenario ran `runs` times per server; the table shows the median run by the figure that
scenario is about (CPU per delivery; the delivery rate at the ceiling; p99 under overload),
with the spread of that figure in brackets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The figure each scenario's median run is picked by.
KEY = {"ceiling": "deliveries_per_s", "overload": "p99_ms", "workers": "p99_ms"}
CPU_SCENARIOS = ("many-jobs", "fan-out", "stalled")


def medians(results: list[Any]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r.scenario.key, r.peer), []).append(r.summary())
    table = []
    for (scenario, _), runs in rows.items():
        key = KEY.get(scenario, "cpu_us_per_delivery")
        values = [s[key] for s in runs]
        med = runs[sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]]
        table.append({**med, "spread": [min(values), max(values)], "spread_of": key, "runs": len(runs)})
    return table


def _spread(s: dict[str, Any]) -> str:
    lo, hi = s["spread"]
    return "" if s["runs"] < 2 else f" ({lo:,}–{hi:,})"


def report(
    results: list[Any],
    celery: dict[str, Any],
    idle: dict[str, dict[str, float]],
    out: Path,
    setup: dict[str, Any],
    notes: list[str],
    peers: list[str],
) -> None:
    table = medians(results)
    (out / "benchmarks.json").write_text(
        json.dumps(
            {
                "setup": setup,
                "scenarios": table,
                "celery": celery,
                "idle_rss_kib_per_connection": idle,
                "notes": notes,
            },
            indent=2,
        )
    )
    by = {(s["scenario"], s["peer"]): s for s in table}
    ceiling = {p: by[("ceiling", p)]["deliveries_per_s"] for p in peers if ("ceiling", p) in by}
    lines = [
        "# jobwire and its peers, same run",
        "",
        f"- Command: `{setup['command']}`, {setup['runs']} run(s) of each scenario; each row is the",
        "  median run, with the spread of its figure over the runs in brackets.",
        f"- Machine: {setup['cores']} cores, Python {setup['python']}, loopback; "
        f"took {setup['minutes']} minutes.",
        "- Every server on uvicorn + uvloop + httptools, without per-message deflate; 100-byte payloads;",
        f"  the clients split over {setup['client_procs']} load-generator processes.",
        "- Cores: CPU seconds per wall second of the server (all its processes) and of the load",
        "  generator (its client processes and the publisher), to say which saturated.",
        "",
        "## CPU per delivery",
        "",
        "| scenario | server | CPU per delivery (µs) | per event × watcher (µs) | deliveries/s "
        "| p50 / p99 / p99.9 (ms) | frames / published | clients complete | server cores (kernel share) "
        "| load cores | RSS per connection (KiB) | RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in (by[(k, p)] for k in CPU_SCENARIOS for p in peers if (k, p) in by):
        lines.append(
            f"| {s['name']} | {s['peer']} | **{s['cpu_us_per_delivery']}**{_spread(s)} "
            f"| {s['cpu_us_per_event_watcher']} | {s['deliveries_per_s']:,} "
            f"| {s['p50_ms']} / {s['p99_ms']} / {s['p999_ms']} | {s['deliveries']:,} / {s['published']:,} "
            f"| {s['complete']} | {s['server_core']} ({s['server_kernel_share']:.0%}) | {s['load_core']} "
            f"| {s['rss_kib_per_connection']} | {s['rss_growth_mib']} |"
        )
    relay = {k: by[(k, "broadcaster")] for k in CPU_SCENARIOS if (k, "broadcaster") in by}
    ours = {k: by[(k, "jobwire")] for k in CPU_SCENARIOS if (k, "jobwire") in by}
    if relay and ours:
        lines += ["", "jobwire's CPU per delivery as a share of the relay's (the goal: 0.5 or less): "]
        lines[-1] += ", ".join(
            f"{k} {ours[k]['cpu_us_per_delivery'] / max(relay[k]['cpu_us_per_delivery'], 1e-9):.2f}"
            for k in CPU_SCENARIOS
            if k in ours and k in relay
        )
    if ceiling:
        lines += [
            "",
            "## The most one process delivers",
            "",
            "Every event a new state, so nothing may be coalesced; measured until the last publish.",
            "Per core-second: 1 / CPU per delivery, what a process with a core of its own would deliver",
            "(on a machine whose load generator shares the cores, the server may get less than one).",
            "≥: it delivered all that was offered, so its ceiling is higher than the figure.",
            "",
            "| scenario | server | deliveries/s | × the relay's | CPU per delivery (µs) "
            "| per core-second of the server | p50 / p99 (ms) | server cores (kernel share) | load cores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in peers:
            if ("ceiling", p) not in by:
                continue
            s = by[("ceiling", p)]
            times = (
                f"{s['deliveries_per_s'] / ceiling['broadcaster']:.2f}×" if ceiling.get("broadcaster") else ""
            )
            at_least = "≥ " if s["deliveries_per_s"] >= 0.99 * s["offered_per_s"] else ""  # all offered
            lines.append(
                f"| {s['name']} | {p} | **{at_least}{s['deliveries_per_s']:,}**{_spread(s)} | {times} "
                f"| {s['cpu_us_per_delivery']} | {1e6 / max(s['cpu_us_per_delivery'], 1e-9):,.0f} "
                f"| {s['p50_ms']} / {s['p99_ms']} | {s['server_core']} ({s['server_kernel_share']:.0%}) "
                f"| {s['load_core']} |"
            )
    over = [by[(k, p)] for k in ("overload", "workers") for p in peers if (k, p) in by]
    if over:
        lines += [
            "",
            "## Overload: offered more than one process delivers",
            "",
            "Every client counts what it got of what was published. Each job changes state every",
            f"{setup['phase']} events; a transition (a state's first event, or the final one) must",
            "never be lost, and progress may be coalesced (jobwire says so in the frame,",
            '`"coalesced": n`, and says events it lost in a `gap` message). *Missing*: events neither',
            "received nor said coalesced or lost when the run ended (the wait for final events after",
            "the last publish ran out): still queued, or lost without a word. Latency is over the",
            "events received.",
            "",
            f"Offered: {setup.get('overload_factor', 5):g} × what one jobwire process delivers writing each",
            f"event on its own ({setup.get('overload_base', 0):,}/s: its ceiling, at most a core's worth at",
            "its fan-out CPU per delivery); × each server's own ceiling in brackets.",
            "",
            "| scenario | server | offered/s (× its ceiling) | deliveries/s | p50 / p99 / p99.9 (ms) "
            "| transitions received / sent | coalesced | said lost | missing | finals | server cores "
            "| load cores | RSS growth (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in over:
            factor = f" ({s['offered_per_s'] / ceiling[s['peer']]:.1f}×)" if ceiling.get(s["peer"]) else ""
            lost = s["transitions_lost"]
            got = f"{s['transitions_got']:,} / {s['transitions_sent']:,}" + (
                f" (**{lost:,} not received**)" if lost else ""
            )
            lines.append(
                f"| {s['name']} | {s['peer']} | {s['offered_per_s']:,}{factor} | {s['deliveries_per_s']:,} "
                f"| {s['p50_ms']} / **{s['p99_ms']}**{_spread(s)} / {s['p999_ms']} | {got} "
                f"| {s['coalesced']:,} | {s['lost_said']:,} | {s['missing']:,} "
                f"| {s['finals']:,}/{s['clients']:,} | {s['server_core']} ({s['processes']} processes) "
                f"| {s['load_core']} | {s['rss_growth_mib']} |"
            )
    counts = sorted({n for per in idle.values() for n in per}, key=int)
    if counts:
        lines += [
            "",
            "## Memory",
            "",
            "Server RSS per idle websocket (connected and subscribed to one job), KiB:",
            "",
            "| server | " + " | ".join(f"{int(n):,} connections" for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for name, per in idle.items():
            lines.append(f"| {name} | " + " | ".join(str(per.get(n, "")) for n in counts) + " |")
    if celery:
        lines += [
            "",
            "## Celery's own way against jobwire's",
            "",
            "| measure | jobwire | Celery | ratio |",
            "|---|---|---|---|",
        ]
        for n in (100, 1000):
            b = celery[f"batch_{n}"]
            lines.append(
                f"| batch status of {n:,} ids | {b['jobwire_ms']} ms "
                f"| {b['asyncresult_loop_ms']} ms (AsyncResult loop) | {b['ratio']}× |"
            )
        p = celery["progress_report"]
        lines.append(
            f"| one progress report (worker) | {p['jobwire_us']} µs, {p['jobwire_round_trips']} round trip "
            f"| {p['celery_update_state_us']} µs (update_state) | |"
        )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    (out / "benchmarks-compare.md").write_text("\n".join(lines) + "\n")
    _charts(table, out, peers)


def _charts(table: list[dict[str, Any]], out: Path, peers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in (*CPU_SCENARIOS, "overload") if any(s["scenario"] == k for s in table)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        rows = {s["peer"]: s for s in table if s["scenario"] == key}
        figure = "p99_ms" if key == "overload" else "cpu_us_per_delivery"
        values = [rows[p][figure] if p in rows else 0 for p in peers]
        ax.bar(peers, values, color=["#2f6fde", "#999999", "#bbbbbb"][: len(peers)])
        name = next(iter(rows.values()))["name"]
        ax.set_title(f"{key}: {name}", fontsize=8)
        ax.set_ylabel("p99 latency (ms)" if key == "overload" else "server CPU per delivery (µs)")
        if key == "overload":  # from 1 ms, so the bars' lengths compare
            ax.set_yscale("log")
            ax.set_ylim(bottom=1)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-cpu.png", dpi=110)
