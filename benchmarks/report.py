"""Per-launch figures, the printed table, and the issue's targets."""

from __future__ import annotations

from typing import Any

from .stats import summary

TARGET_N = 200
CAPACITY_TARGET = 1000


def launch_figures(round_: dict[str, Any]) -> dict[str, Any]:
    """Reply latency (reply − command), hub-ready time (hub-ready − command), and overhead
    (reply − hub-ready: the time the system adds after the hub has the server ready)."""
    launches = round_["launches"]
    ok = [e for e in launches if e["ok"] and e.get("replied")]
    reply = [e["replied"] - e["sent"] for e in ok]
    timed = [e for e in ok if e.get("hub_ready") is not None]
    ready = [e["hub_ready"] - e["sent"] for e in timed]
    overhead = [e["replied"] - e["hub_ready"] for e in timed]
    # Overhead = (hub's last answer − hub-ready) + (reply − hub's last answer): the first part is
    # requests the system still makes after the server is ready, the second its own work and the broker.
    split = [e for e in timed if e.get("last_hub_answer")]
    # How far behind the hub's own mark the observer's progress stream delivered "ready".
    stream_lag = [
        e["stream_ready"] - e["hub_ready"]
        for e in timed
        if e.get("stream_ready") and e.get("ready_source") == "hub-log"
    ]
    after_ready = [max(0.0, e["last_hub_answer"] - e["hub_ready"]) for e in split]
    after_hub = [e["replied"] - max(e["last_hub_answer"], e["hub_ready"]) for e in split]
    figures = {
        "system": round_["system"],
        "n": round_["n"],
        "delay": round_["delay"],
        "launches": len(launches),
        "failures": len(launches) - len(ok),
        "reply_s": summary(reply),
        "hub_ready_s": summary(ready),
        "overhead_s": summary(overhead),
        "overhead_hub_part_s": summary(after_ready),
        "overhead_after_hub_s": summary(after_hub),
        # Which request was each launch's last at the hub, and how long after ready it was answered.
        "overhead_hub_part_by_request": {
            shape: summary(parts)
            for shape in sorted({e.get("last_hub_request") or "?" for e in split})
            if (parts := [a for e, a in zip(split, after_ready) if (e.get("last_hub_request") or "?") == shape])
        },
        "observer_stream_lag_s": summary(stream_lag),
        "ready_from_stream": sum(1 for e in timed if e.get("ready_source") == "stream"),
        "ready_from_hub_log": sum(1 for e in timed if e.get("ready_source") == "hub-log"),
        "untimed": len(ok) - len(timed),
        "wall_s": round_["wall_s"],
        "wall_extrapolated": round_.get("wall_extrapolated", False),
        "hub_requests_per_launch": round_.get("hub_requests_per_launch"),
        "hub_cpu_s_per_launch": round_["hub_cpu_s"] / len(launches) if launches else None,
    }
    if "consumer_cpu_s" in round_:
        figures["consumer_cpu_s_per_launch"] = round_["consumer_cpu_s"] / round_["n"]
        figures["consumer_peak_rss_mb"] = round_["consumer_peak_rss_mb"]
    if "remove" in round_:
        figures["remove_s"] = summary([x for x in round_["remove"]["latencies"] if x is not None])
        figures["remove_failures"] = round_["remove"]["failures"]
        figures["hub_requests_per_remove"] = round_["remove"]["hub_requests_per_remove"]
    return figures


def merge_repetitions(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool the launches of repeated rounds of the same system, N and delay."""
    merged: dict[tuple[str, int, float], dict[str, Any]] = {}
    for r in rounds:
        key = (r["system"], r["n"], r["delay"])
        if key not in merged:
            merged[key] = {
                **r,
                "launches": list(r["launches"]),
                "repetitions": 1,
                "_walls": [r["wall_s"]],
                "_hub_cpu": [r["hub_cpu_s"]],
                "_req": [r.get("hub_requests_per_launch")],
                "_cpu": [r.get("consumer_cpu_s")],
                "_rss": [r.get("consumer_peak_rss_mb")],
                "_remove": [r.get("remove")],
            }
            continue
        m = merged[key]
        m["launches"] += r["launches"]
        m["repetitions"] += 1
        m["_walls"].append(r["wall_s"])
        m["_hub_cpu"].append(r["hub_cpu_s"])
        m["_req"].append(r.get("hub_requests_per_launch"))
        m["_cpu"].append(r.get("consumer_cpu_s"))
        m["_rss"].append(r.get("consumer_peak_rss_mb"))
        m["_remove"].append(r.get("remove"))
    out = []
    for m in merged.values():
        reps = m["repetitions"]
        m["wall_s"] = sum(m["_walls"]) / reps  # a repetition is a round of N: the mean wall time
        m["hub_cpu_s"] = sum(m["_hub_cpu"])
        if m["_req"][0] is not None:
            m["hub_requests_per_launch"] = sum(m["_req"]) / reps
        if m["_cpu"][0] is not None:
            m["consumer_cpu_s"] = sum(m["_cpu"]) / reps
            m["consumer_peak_rss_mb"] = max(m["_rss"])
        if m["_remove"][0] is not None:
            m["remove"] = {
                "latencies": [x for rm in m["_remove"] for x in rm["latencies"]],
                "failures": sum(rm["failures"] for rm in m["_remove"]),
                "hub_requests_per_remove": sum(rm["hub_requests_per_remove"] for rm in m["_remove"]) / reps,
            }
        out.append({k: v for k, v in m.items() if not k.startswith("_")})
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    "system",
    "N",
    "delay",
    "fail",
    "reply p50/p95/max s",
    "ready p50 s",
    "overhead p50/p95/max ms",
    "wall s",
    "hub req/launch",
    "CPU s/launch",
    "peak RSS MB",
    "note",
)


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for f in results["figures"]["launches"]:
        r, o = f["reply_s"], f["overhead_s"]
        note = []
        if f["wall_extrapolated"]:
            note.append(f"wall scaled from {f.get('measured', '?')}")
        if f["ready_from_stream"] or f["untimed"]:
            note.append(
                f"ready from: {f['ready_from_hub_log']} hub log/{f['ready_from_stream']} stream/{f['untimed']} none"
            )
        if f["observer_stream_lag_s"]["count"]:
            note.append(
                f"stream {_ms(f['observer_stream_lag_s']['p50'])} ms behind hub ({f['observer_stream_lag_s']['count']})"
            )
        if f["overhead_hub_part_s"]["p50"] is not None and f["system"] in ("launcher", "floor"):
            note.append(
                f"overhead = hub {_ms(f['overhead_hub_part_s']['p50'])}/{_ms(f['overhead_hub_part_s']['p95'])}"
                f" + after {_ms(f['overhead_after_hub_s']['p50'])}/{_ms(f['overhead_after_hub_s']['p95'])} ms"
            )
        if f.get("remove_s"):
            note.append(f"remove p95 {_s(f['remove_s']['p95'])} s, {_s(f['hub_requests_per_remove'], 1)} req")
        rows.append(
            (
                f["system"],
                str(f["n"]),
                f"{f['delay']:g}",
                str(f["failures"]),
                f"{_s(r['p50'])}/{_s(r['p95'])}/{_s(r['max'])}",
                _s(f["hub_ready_s"]["p50"]),
                f"{_ms(o['p50'])}/{_ms(o['p95'])}/{_ms(o['max'])}",
                _s(f["wall_s"], 1),
                _s(f["hub_requests_per_launch"], 1),
                _s(f.get("consumer_cpu_s_per_launch"), 4),
                _s(f.get("consumer_peak_rss_mb"), 0),
                "; ".join(note),
            )
        )
    capacity = results["figures"].get("capacity")
    if capacity:
        rows.append(
            (
                "capacity",
                str(capacity["n"]),
                f"{capacity['delay']:g}",
                str(capacity["failures"]),
                f"{_s(capacity['reply_s']['p50'])}/{_s(capacity['reply_s']['p95'])}/{_s(capacity['reply_s']['max'])}",
                "-",
                "-",
                _s(capacity["wall_s"], 1),
                _s(capacity["hub_requests_per_launch"], 1),
                _s(capacity["consumer_cpu_s_per_launch"], 4),
                _s(capacity["consumer_peak_rss_mb"], 0),
                f"peak in flight {capacity['peak_in_flight']}",
            )
        )
    read = results["figures"].get("read")
    if read:
        for system in ("echo", "launcher", "hub_direct"):
            x = read[system]
            rows.append(
                (
                    f"read:{system}",
                    str(read["concurrency"]),
                    "-",
                    str(x["failures"]),
                    f"{_s(x['latency_s']['p50'], 3)}/{_s(x['latency_s']['p95'], 3)}/{_s(x['latency_s']['max'], 3)}",
                    "-",
                    "-",
                    _s(x["seconds"], 1),
                    "-",
                    _s(x.get("cpu_s_per_command"), 5),
                    _s(x.get("peak_rss_mb"), 0),
                    f"{x['per_second']:.0f} cmd/s",
                )
            )
    return rows


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def format_table(results: dict[str, Any]) -> str:
    lines = [*text_table([COLUMNS, *table_rows(results)]), ""]
    for target in results["targets"]:
        lines.append(f"[{target['status']:>4}] {target['target']}: {target['measured']}")
    return "\n".join(lines)


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"launches": []}
    for round_ in merge_repetitions(raw["rounds"]):
        f = launch_figures(round_)
        f["repetitions"] = round_["repetitions"]
        if "measured_launches" in round_:
            f["measured"] = round_["measured_launches"] * round_["repetitions"]
        out["launches"].append(f)
    if raw.get("capacity"):
        c = raw["capacity"]
        out["capacity"] = {
            "n": c["n"],
            "delay": c["delay"],
            "peak_in_flight": c["peak_in_flight"],
            "failures": c["failures"],
            "reply_s": summary([x for x in c["reply_latencies"] if x is not None]),
            "wall_s": c["wall_s"],
            "consumer_cpu_s_per_launch": c["consumer_cpu_s"] / c["n"],
            "consumer_peak_rss_mb": c["consumer_peak_rss_mb"],
            "hub_requests_per_launch": c["hub_requests_per_launch"],
            "hub_cpu_s": c["hub_cpu_s"],
        }
    if raw.get("read"):
        read = raw["read"]
        out["read"] = {"concurrency": read["concurrency"]}
        for system in ("echo", "launcher", "hub_direct"):
            x = read[system]
            out["read"][system] = {
                "per_second": x["per_second"],
                "completed": x["completed"],
                "failures": x["failures"],
                "seconds": x["seconds"],
                "latency_s": summary(x["latencies"]),
                "cpu_s_per_command": x["cpu_s"] / x["completed"] if "cpu_s" in x and x["completed"] else None,
                "peak_rss_mb": x.get("peak_rss_mb"),
            }
        out["read"]["ratio_to_echo"] = read["launcher"]["per_second"] / read["echo"]["per_second"]
    return out


def _find(figs: dict[str, Any], system: str, n: int, delay: float) -> dict[str, Any] | None:
    for f in figs["launches"]:
        if f["system"] == system and f["n"] == n and f["delay"] == delay:
            return f
    return None


def _status(ok: bool, exact: bool) -> str:
    return ("met" if ok else "MISS") if exact else ("met?" if ok else "MISS")


def targets(figs: dict[str, Any], ns: list[int], delays: list[float]) -> list[dict[str, Any]]:
    """The issue's targets, judged at N = 200 if it ran, else at the largest N (marked with '?')."""
    out: list[dict[str, Any]] = []
    n = TARGET_N if TARGET_N in ns else max(ns)
    exact = n == TARGET_N
    at = f" (N={n}{'' if exact else ', not 200'})"
    p95s = {d: (_find(figs, "launcher", n, d) or {}).get("overhead_s", {}).get("p95") for d in delays}
    if all(v is not None for v in p95s.values()):
        worst = max(p95s.values())
        floors = {d: (_find(figs, "floor", n, d) or {}).get("overhead_s", {}).get("p95") for d in delays}
        out.append(
            {
                "target": "overhead over hub-ready p95 <= 50 ms" + at,
                "status": _status(worst <= 0.05, exact),
                "measured": ", ".join(f"{d:g} s delay: {_ms(p95s[d])} ms (floor {_ms(floors[d])} ms)" for d in delays),
            }
        )
    requests = {d: (_find(figs, "launcher", n, d) or {}).get("hub_requests_per_launch") for d in delays}
    if all(v is not None for v in requests.values()):
        ok = all(v <= 5 for v in requests.values())
        out.append(
            {
                "target": "hub requests per launch <= 5, same at every delay" + at,
                "status": _status(ok, exact),
                "measured": ", ".join(f"{d:g} s: {v:.2f}" for d, v in requests.items()),
            }
        )
    c = figs.get("capacity")
    if c:
        exact_c = c["n"] >= CAPACITY_TARGET
        ok = (
            c["peak_in_flight"] >= min(c["n"], CAPACITY_TARGET)
            and c["consumer_peak_rss_mb"] <= 200
            and c["failures"] == 0
        )
        out.append(
            {
                "target": f"1,000 launches in flight, peak RSS <= 200 MB (ran {c['n']})",
                "status": _status(ok, exact_c),
                "measured": f"peak in flight {c['peak_in_flight']}, peak RSS {c['consumer_peak_rss_mb']:.0f} MB, "
                f"{c['consumer_cpu_s_per_launch'] * 1000:.1f} ms CPU/launch, {c['failures']} failures",
            }
        )
    slow = 5.0 if 5.0 in delays else max(delays)
    ours, base_a, base_b = (_find(figs, s, n, slow) for s in ("launcher", "legacy_a", "legacy_b"))
    if ours and base_a:
        ratio = base_a["wall_s"] / ours["wall_s"]
        out.append(
            {
                "target": f"wall time 20x shorter than baseline (a){at[:-1]}, {slow:g} s delay)",
                "status": _status(ratio >= 20, exact and slow == 5.0),
                "measured": f"ours {ours['wall_s']:.1f} s, (a) {base_a['wall_s']:.1f} s"
                f"{' (scaled)' if base_a['wall_extrapolated'] else ''}: {ratio:.1f}x",
            }
        )
    if ours and base_b and ours["overhead_s"]["p50"] and base_b["overhead_s"]["p50"]:
        r50 = base_b["overhead_s"]["p50"] / max(ours["overhead_s"]["p50"], 1e-6)
        r95 = base_b["overhead_s"]["p95"] / max(ours["overhead_s"]["p95"], 1e-6)
        out.append(
            {
                "target": f"detection lag 20x shorter than baseline (b){at[:-1]}, {slow:g} s delay)",
                "status": _status(min(r50, r95) >= 20, exact and slow == 5.0),
                "measured": f"p50 ours {_ms(ours['overhead_s']['p50'])} ms vs (b) {_ms(base_b['overhead_s']['p50'])} ms: {r50:.1f}x; "
                f"p95 {_ms(ours['overhead_s']['p95'])} vs {_ms(base_b['overhead_s']['p95'])} ms: {r95:.1f}x",
            }
        )
    read = figs.get("read")
    if read:
        out.append(
            {
                "target": "read throughput >= 70% of a bare echo consumer",
                "status": _status(read["ratio_to_echo"] >= 0.7, True),
                "measured": f"{read['launcher']['per_second']:.0f} vs {read['echo']['per_second']:.0f} cmd/s "
                f"({read['ratio_to_echo']:.0%}); the hub alone answers {read['hub_direct']['per_second']:.0f} GET/s",
            }
        )
    return out
