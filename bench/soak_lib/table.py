#!/usr/bin/env python3
"""The bench/README.md table of a soak: operations by kind with p50/p99 without and with faults,
faults injected by kind, sandboxes lost, leaks, hung requests, /healthz, the probe sandbox's exec
latency, the daemon's fds and RSS.

    table.py CALM.json FAULTS.json
"""

import json
import sys


def main():
    calm, faults = (json.load(open(p)) for p in sys.argv[1:3])
    out = [f"Soak of {faults['duration_s'] / 60:.0f} min with faults (seed {faults['seed']}), "
           f"baseline {calm['duration_s'] / 60:.0f} min of the same load without faults.", "",
           "| operation | count (calm / faults) | p50 ms calm | p50 ms faults | p99 ms calm "
           "| p99 ms faults |", "|---|---|---|---|---|---|"]
    for kind in sorted(set(calm["ops"]) | set(faults["ops"])):
        c, f = calm["ops"].get(kind, {}), faults["ops"].get(kind, {})
        out.append(f"| {kind} | {c.get('count', 0)} / {f.get('count', 0)} | {c.get('p50_ms', '-')} "
                   f"| {f.get('p50_ms', '-')} | {c.get('p99_ms', '-')} | {f.get('p99_ms', '-')} |")
    out += ["", "| faults injected | " + ", ".join(
        f"{k} {v}" for k, v in sorted(faults["faults"].items())) + " |", "|---|"]
    rows = [
        ("sandboxes acknowledged / lost", f"{faults['acked']} / {len(faults['lost'])}"),
        ("leaks found", len(faults["leaks"])),
        ("requests hung past their deadline", len(faults["hangs"])),
        ("requests dropped by a living daemon", len(faults.get("cuts", []))),
        ("daemon restarts (kill -9 and SIGTERM)", faults["daemon_restarts"]),
        ("/healthz p50 / p99 ms (calm; faults)",
         f"{calm['healthz']['p50_ms']} / {calm['healthz']['p99_ms']}; "
         f"{faults['healthz']['p50_ms']} / {faults['healthz']['p99_ms']}"),
        ("probe sandbox `exec true` p50 / p99 ms, calm",
         f"{faults['probe']['calm_p50_ms']} / {faults['probe']['calm_p99_ms']}"),
        ("... while another sandbox runs a guest fault (max)",
         f"{faults['probe']['fault_p50_ms']} / {faults['probe']['fault_p99_ms']} "
         f"({faults['probe']['fault_max_ms']})"),
        ("daemon fds, last life start -> end",
         f"{faults['daemon']['start']['fds']} -> {faults['daemon']['end']['fds']}"),
        ("daemon private memory MiB start / peak / end",
         f"{faults['daemon']['start']['private'] >> 20} / {faults['daemon']['peak_private'] >> 20} / "
         f"{faults['daemon']['end']['private'] >> 20}"),
        ("daemon RSS MiB start / peak / end",
         f"{faults['daemon']['start']['rss'] >> 20} / {faults['daemon']['peak_rss'] >> 20} / "
         f"{faults['daemon']['end']['rss'] >> 20}"),
        ("checks failed", "; ".join(faults["failed"] + calm["failed"]) or "none"),
    ]
    out += ["", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    print("\n".join(out))


if __name__ == "__main__":
    main()
