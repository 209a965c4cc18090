"""Where the time of one ``pulumi up`` goes: ``python bench/timeline.py N`` (a profile, not a
benchmark).

Runs one ``pulumi up --yes --skip-preview`` of a synthetic cluster of N hosts (bench/gen.py)
with the colmena stand-in sleeping 0 s, as bench/run.py's overhead row does, with the engine's
OpenTelemetry traces written to a file (``--otel-traces file://…``), and prints the engine's
spans on one time line: the CLI's start, each plugin's start, the program's run, and each
step's Check and Create (the render, then the deploys), then the spans summed by name. Runs
inside ``unshare -n`` like the benchmarks; needs root and the engine.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py

SHOWN = (
    "time-to-first-print", "newPlugin", "run-program", "pulumirpc.ResourceProvider/Check",
    "pulumirpc.ResourceProvider/Create", "pulumirpc.ResourceMonitor/SignalAndWaitForShutdown",
)
Span = tuple[float, float, str]


def spans_of(path: Path) -> list[Span]:
    """(start, end, name) of every span in an OpenTelemetry JSON-lines file, by start."""
    spans: list[Span] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    start, end = int(sp["startTimeUnixNano"]), int(sp["endTimeUnixNano"])
                    spans.append((start / 1e9, end / 1e9, sp["name"]))
    return sorted(spans)


def report(spans: list[Span]) -> list[str]:
    t0 = spans[0][0]
    lines = [f"{s - t0:6.2f} -> {e - t0:6.2f} s ({e - s:5.2f} s)  {name}"
             for s, e, name in spans if name in SHOWN]
    total: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for s, e, name in spans:
        total[name][0] += 1
        total[name][1] += e - s
    lines.append("")
    lines += [f"{name:55} {int(n):4} x  {t:6.2f} s"
              for name, (n, t) in sorted(total.items(), key=lambda x: -x[1][1])[:12]]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python bench/timeline.py N", file=sys.stderr)
        return 2
    n = int(argv[0])
    base = Path(tempfile.mkdtemp(prefix="k3scluster-timeline-"))
    try:
        cluster = run.make_cluster(base / "cluster", n)
        proj = run.Project(base, "project")
        at_once = str(max(1, -(-min(n, run.AT_ONCE) // 4)))
        proj.stack("timeline", {**run.our_config(cluster),
                                "k3scluster:maxUnavailable": str(run.AT_ONCE),
                                "k3scluster:runnerProcesses": at_once})
        traces = base / "traces.json"
        r = run.check(proj.pulumi(
            ["up", "--yes", "--skip-preview", "--stack", "timeline", "--parallel", "64",
             "--otel-traces", f"file://{traces}"], {"COLMENA_SLEEP": "0"}), "up")
        print(f"pulumi up of {n} host(s), the stand-in sleeping 0 s: {r.wall:.2f} s")
        print("\n".join(report(spans_of(traces))))
        for line in proj.log.read_text().splitlines():
            call = json.loads(line)
            print(f"colmena stand-in {','.join(call['hosts'])}: {call['end'] - call['start']:.2f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
