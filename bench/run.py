"""k3scluster benchmarks: writes BENCHMARKS.md (``python bench/run.py [--quick]``).

Every timed command is a whole process (``python -m k3scluster render``, the real Pulumi engine
``.tools/bin/pulumi``, the colmena stand-in ``tests/bin/colmena``), started inside a network
namespace with only loopback up (``unshare -n``), on synthetic clusters (bench/gen.py) in a
temporary directory that is removed afterwards. Needs root (for ``unshare -n``) and the engine
(``scripts/bootstrap-pulumi``). ``--quick`` runs fewer sizes and 2 runs each, a smoke check
only (it does not meet the "5 runs" rule of BENCHMARKS.md and writes BENCHMARKS.quick.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # engine.engine_env: the tests' offline engine setup

from engine import PULUMI, engine_env, have_engine, netns_available
from gen import host_name, make_cluster

STANDIN = ROOT / "tests" / "bin" / "colmena"
FLOOR = ROOT / "bench" / "floor"
FINDINGS = ROOT / "bench" / "findings.md"
NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float  # seconds
    maxrss_kb: int  # largest single process of the run (wait4 rusage)
    user: float  # CPU seconds in user mode of the process and its waited-for children (wait4)
    system: float  # CPU seconds in the kernel, likewise
    tree_kb: int  # largest sampled sum of RSS over the process tree
    code: int
    out: str
    err: str


def _tree_rss_kb(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measure(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, sample: bool = False
) -> Run:
    """Runs ``argv`` in a loopback-only network namespace; wall time from fork to reap."""
    out_f = tempfile.TemporaryFile()  # noqa: SIM115 - read back after the process ends
    err_f = tempfile.TemporaryFile()  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*NETNS, *argv],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=out_f,
        stderr=err_f,
    )
    peak = [0]
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))

    thread = threading.Thread(target=sampler, daemon=True) if sample else None
    if thread:
        thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    if thread:
        thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    with out_f, err_f:
        out_f.seek(0)
        err_f.seek(0)
        return Run(
            wall,
            usage.ru_maxrss,
            usage.ru_utime,
            usage.ru_stime,
            peak[0],
            proc.returncode,
            out_f.read().decode(errors="replace"),
            err_f.read().decode(errors="replace"),
        )


def check(run: Run, what: str) -> Run:
    if run.code != 0:
        raise SystemExit(f"{what} failed ({run.code}):\n{run.out[-3000:]}\n{run.err[-3000:]}")
    return run


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_s(values: Sequence[float]) -> str:
    med, lo, hi = stats(values)
    return f"{med:.2f} s ({lo:.2f}–{hi:.2f})"


def mib(kb: float) -> str:
    return f"{kb / 1024:.0f} MiB"


# -- the machine ----------------------------------------------------------------------------


def machine() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    pv = subprocess.run(
        [str(PULUMI), "version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", mem),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("pulumi", pv or "?"),
        ("load average at start", load_average()),
    ]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as the table prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- projects -------------------------------------------------------------------------------


class Project:
    """A Pulumi project in a temp dir: ours (our __main__.py, k3scluster linked) or the floor."""

    def __init__(self, base: Path, name: str, floor: bool = False) -> None:
        self.dir = base / name
        self.dir.mkdir(parents=True)
        src = FLOOR if floor else ROOT
        shutil.copy(src / "Pulumi.yaml", self.dir)
        shutil.copy(src / "__main__.py", self.dir)
        if not floor:
            (self.dir / "k3scluster").symlink_to(ROOT / "k3scluster")
        self.log = base / f"{name}.colmena.log"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return engine_env(self.dir, {"COLMENA_LOG": str(self.log), **(extra or {})})

    def stack(self, stack: str, config: Mapping[str, str]) -> None:
        text = "config:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in config.items())
        (self.dir / f"Pulumi.{stack}.yaml").write_text(text)
        r = subprocess.run(
            [str(PULUMI), "stack", "init", stack, "--non-interactive"],
            check=False,
            cwd=self.dir,
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"stack init {stack} failed: {r.stderr}")

    def pulumi(
        self, args: Sequence[str], extra: Mapping[str, str] | None = None, sample: bool = False
    ) -> Run:
        return measure(
            [str(PULUMI), *args, "--non-interactive"], self.dir, self.env(extra), sample=sample
        )


def our_config(cluster: Path) -> dict[str, str]:
    return {
        "k3scluster:clusterDir": str(cluster),
        "k3scluster:colmena": str(STANDIN),
        "k3scluster:runner": "python",
        "k3scluster:waitReady": "false",  # no K3s behind the stand-in: gates off
    }


# -- benchmarks -----------------------------------------------------------------------------

REPRO_PREFIX = "unshare -n sh -c 'ip link set lo up && exec \"$@\"' sh "


def bench_render(base: Path, sizes: Sequence[int], runs: int) -> tuple[list[str], dict[int, float]]:
    rows = []
    medians: dict[int, float] = {}
    for n in sizes:
        cluster = make_cluster(base / f"render-{n}", n)
        out = base / f"render-{n}-out"
        walls, rss, user, system = [], [], [], []
        for i in range(runs):
            progress(f"check+render N={n} run {i + 1}/{runs}")
            r = check(
                measure(
                    [sys.executable, "-m", "k3scluster", "render", str(cluster), "--out", str(out)],
                    ROOT,
                ),
                "render",
            )
            walls.append(r.wall)
            rss.append(r.maxrss_kb)
            user.append(r.user)
            system.append(r.system)
        medians[n] = statistics.median(walls)
        rows.append(f"| {n} | {fmt_s(walls)} | {fmt_s(user)} | {fmt_s(system)} | {mib(max(rss))} |")
    return rows, medians


def count_types(preview_json: str) -> dict[str, int]:
    types: dict[str, int] = {}
    for s in json.loads(preview_json)["steps"]:
        t = s["urn"].split("::")[-2].split("$")[-1]
        types[t] = types.get(t, 0) + 1
    return types


def bench_preview(base: Path, sizes: Sequence[int], runs: int) -> tuple[list[str], list[str]]:
    rows, notes = [], []
    for n in sizes:
        cluster = make_cluster(base / f"preview-{n}", n)
        ours = Project(base, f"preview-{n}-ours")
        ours.stack("bench", our_config(cluster))
        first = check(ours.pulumi(["preview", "--json", "--stack", "bench"]), "preview")
        types = count_types(first.out)
        steps = sum(v for k, v in types.items() if k.startswith("pulumi-python:dynamic"))
        comps = sum(v for k, v in types.items() if k.startswith("k3scluster:index:"))
        other = sum(types.values()) - steps - comps  # the stack itself
        digests = statistics.median(
            len(s["newState"]["inputs"].get("inputs") or {})
            for s in json.loads(first.out)["steps"]
            if s["urn"].endswith("-deploy")
        )
        floor = Project(base, f"preview-{n}-floor", floor=True)
        floor.stack("bench", {"floor:components": str(comps), "floor:steps": str(steps)})
        check(floor.pulumi(["preview", "--json", "--stack", "bench"]), "floor preview")
        # the same floor, its steps carrying properties shaped like ours (argv lists and as
        # many digests as our deploy steps): what carrying the inputs costs the engine
        props = Project(base, f"preview-{n}-floor-props", floor=True)
        props.stack(
            "bench",
            {
                "floor:components": str(comps),
                "floor:steps": str(steps),
                "floor:stepInputs": str(int(digests)),
            },
        )
        check(props.pulumi(["preview", "--json", "--stack", "bench"]), "floor-props preview")
        a, b, c, a_rss, b_rss = [], [], [], [], []
        for i in range(runs):  # alternate, so that load from elsewhere hits all alike
            progress(f"preview N={n} run {i + 1}/{runs}")
            r = check(ours.pulumi(["preview", "--stack", "bench"], sample=True), "preview")
            a.append(r.wall)
            a_rss.append(r.tree_kb)
            r = check(floor.pulumi(["preview", "--stack", "bench"], sample=True), "floor")
            b.append(r.wall)
            b_rss.append(r.tree_kb)
            c.append(check(props.pulumi(["preview", "--stack", "bench"]), "floor-props").wall)
        ratio = statistics.median(a) / statistics.median(b)
        ratio_props = statistics.median(a) / statistics.median(c)
        ok = "met" if ratio <= 1.3 else "**missed**"
        rows.append(
            f"| {n} | {comps} + {steps} (+{other}) | {fmt_s(a)} | {fmt_s(b)} | {ratio:.2f}x "
            f"({ok}) | {fmt_s(c)} ({int(digests)} digests a step) | {ratio_props:.2f}x | "
            f"{mib(max(a_rss))} | {mib(max(b_rss))} |"
        )
        notes.append(f"N={n}: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())))
    return rows, notes


# agent hosts deployed at once (k3scluster:maxUnavailable) in every variant but *default*: as
# many as the peer's colmena works on at once (-p 10)
AT_ONCE = 10


def deploy_rounds(n: int, at_once: int) -> int:
    """Rounds of the rolling order in a synthetic cluster: the init-server's host, each other
    server host alone (hosts 1 and 2), then the other hosts (each with an agent) ``at_once``
    at a time."""
    servers = min(n, 3)
    return servers + -(-max(0, n - servers) // at_once)


def safe_order_calls(n: int, hive: Path) -> list[list[str]]:
    """colmena in the order this project deploys: one call per server host (hosts 0-2 of a
    synthetic cluster, the init-server first), then the rest in one call with ``-p 10``."""
    servers = min(n, 3)
    groups = [[host_name(i)] for i in range(servers)]
    if n > servers:
        groups.append([host_name(i) for i in range(servers, n)])
    return [
        [str(STANDIN), "apply", "switch", "--on", ",".join(g), "-f", str(hive), "-p", "10"]
        for g in groups
    ]


def overhead_target(n: int) -> float:
    """The target for ``up``'s own overhead (the stand-in sleeping 0 s): 1 s + 0.2 s a host."""
    return 1.0 + 0.2 * n


def resource_counts(proj: Project, stack: str) -> tuple[int, int]:
    """(components, steps) of the stack's preview: what the floor registers to match it."""
    types = count_types(check(proj.pulumi(["preview", "--json", "--stack", stack]), "preview").out)
    steps = sum(v for k, v in types.items() if k.startswith("pulumi-python:dynamic"))
    comps = sum(v for k, v in types.items() if k.startswith("k3scluster:index:"))
    return comps, steps


def bench_up(base: Path, sizes: Sequence[int], runs: int) -> tuple[list[str], list[str]]:
    rows, overhead_rows = [], []
    for n in sizes:
        cluster = make_cluster(base / f"up-{n}", n)
        proj = Project(base, f"up-{n}-proj")
        wide = max(1, -(-min(n, AT_ONCE) // 4))  # provider processes for a whole batch
        proj.stack("count", our_config(cluster))
        comps, steps = resource_counts(proj, "count")
        floor = Project(base, f"up-{n}-floor", floor=True)
        # (name, extra config, extra pulumi args, COLMENA_SLEEP)
        batch = {"k3scluster:maxUnavailable": str(AT_ONCE)}
        variants = [
            ("default", {}, [], "1"),
            ("wide", {**batch, "k3scluster:runnerProcesses": str(wide)}, ["--parallel", "64"], "1"),
            ("overhead", {**batch, "k3scluster:runnerProcesses": str(wide)},
             ["--parallel", "64"], "0"),
            ("one", {**batch, "k3scluster:runnerProcesses": "1"}, ["--parallel", "64"], "1"),
        ]
        walls: dict[str, list[float]] = {label: [] for label in [*(v[0] for v in variants), "floor"]}
        for i in range(runs):
            for label, config, extra, sleep in variants:
                stack = f"{label}-{i}"
                proj.stack(stack, {**our_config(cluster), **config})
                progress(f"up N={n} {label} run {i + 1}/{runs}")
                r = check(
                    proj.pulumi(
                        ["up", "--yes", "--skip-preview", "--stack", stack, *extra],
                        {"COLMENA_SLEEP": sleep},
                    ),
                    "up",
                )
                walls[label].append(r.wall)
            # the engine's own cost of an up that creates as many resources as ours
            floor.stack(f"up-{i}", {"floor:components": str(comps), "floor:steps": str(steps)})
            progress(f"up N={n} floor run {i + 1}/{runs}")
            walls["floor"].append(
                check(
                    floor.pulumi(["up", "--yes", "--skip-preview", "--stack", f"up-{i}",
                                  "--parallel", "64"]),
                    "floor up",
                ).wall
            )
        hive = cluster / ".k3scluster" / "default-0" / "hive.nix"
        calls = safe_order_calls(n, hive)
        script = " && ".join(" ".join(c) for c in calls)  # host names and paths: no quoting
        peer: list[float] = []
        for i in range(runs):
            progress(f"peer: colmena in the safe order ({len(calls)} call(s)) run {i + 1}/{runs}")
            r = check(
                measure(
                    ["sh", "-c", script],
                    proj.dir,
                    {**os.environ, "COLMENA_SLEEP": "1", "COLMENA_LOG": str(proj.log)},
                ),
                "stand-in",
            )
            peer.append(r.wall)
        rounds = deploy_rounds(n, AT_ONCE)
        ideal = statistics.median(walls["overhead"]) + rounds
        ratio = statistics.median(walls["wide"]) / ideal
        ok = "met" if ratio <= 1.5 else "**missed**"
        vs_peer = statistics.median(walls["wide"]) / statistics.median(peer)
        rows.append(
            f"| {n} | {fmt_s(walls['default'])} | {fmt_s(walls['wide'])} ({wide} process(es)) | "
            f"{fmt_s(walls['one'])} | {ideal:.2f} s ({rounds} round(s)) | {ratio:.2f}x ({ok}) | "
            f"{fmt_s(peer)} | {vs_peer:.2f}x |"
        )
        over, fl = statistics.median(walls["overhead"]), statistics.median(walls["floor"])
        target = overhead_target(n)
        ok = "met" if over <= target else "**missed**"
        overhead_rows.append(
            f"| {n} | {comps} + {steps} | {fmt_s(walls['overhead'])} | {target:.1f} s ({ok}) | "
            f"{fmt_s(walls['floor'])} | {over - fl:.2f} s |"
        )
    return rows, overhead_rows


def bench_incremental(base: Path, n: int, runs: int) -> list[str]:
    cluster = make_cluster(base / f"incr-{n}", n)
    proj = Project(base, f"incr-{n}-proj")
    proj.stack("bench", our_config(cluster))
    env = {"COLMENA_SLEEP": "1"}
    progress(f"incremental N={n}: first up")
    check(proj.pulumi(["up", "--yes", "--skip-preview", "--stack", "bench"], env), "up")
    conf = cluster / "nixConfigs" / f"{host_name(n - 1)}.nix"
    res: dict[str, list[float]] = {k: [] for k in ("pn", "un", "pc", "uc")}
    for i in range(runs):
        progress(f"incremental N={n} run {i + 1}/{runs}")
        res["pn"].append(check(proj.pulumi(["preview", "--stack", "bench"], env), "p").wall)
        res["un"].append(
            check(proj.pulumi(["up", "--yes", "--skip-preview", "--stack", "bench"], env), "u").wall
        )
        conf.write_text(conf.read_text() + f"# change {i}\n")
        r = check(proj.pulumi(["preview", "--json", "--stack", "bench"], env), "p")
        changed = {
            s["urn"].split("::")[-1]: s["op"]
            for s in json.loads(r.out)["steps"]
            if s["op"] != "same"
        }
        if changed != {f"{host_name(n - 1)}-deploy": "update"}:
            raise SystemExit(f"unexpected changes after one nixConfig edit: {changed}")
        res["pc"].append(check(proj.pulumi(["preview", "--stack", "bench"], env), "p").wall)
        # the timed preview above saw the same change; now deploy it
        res["uc"].append(
            check(proj.pulumi(["up", "--yes", "--skip-preview", "--stack", "bench"], env), "u").wall
        )
    return [
        f"| `pulumi preview` | {fmt_s(res['pn'])} | {fmt_s(res['pc'])} |",
        f"| `pulumi up --skip-preview` | {fmt_s(res['un'])} | {fmt_s(res['uc'])} |",
    ]


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes, 2 runs: a smoke check")
    ap.add_argument("--out", type=Path, help="default BENCHMARKS.md (BENCHMARKS.quick.md)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if not have_engine():
        print("bench: .tools/bin/pulumi is missing: run scripts/bootstrap-pulumi", file=sys.stderr)
        return 2
    if not netns_available():
        print("bench: needs root, unshare and ip (loopback-only namespaces)", file=sys.stderr)
        return 2
    quick = args.quick
    runs = 2 if quick else 5
    out_path = args.out or ROOT / ("BENCHMARKS.quick.md" if quick else "BENCHMARKS.md")
    render_sizes = [10, 100] if quick else [10, 100, 250, 1000]
    preview_sizes = [5, 50] if quick else [5, 50, 200]
    up_sizes = [1, 10] if quick else [1, 10, 50]
    incr_n = 10 if quick else 50
    cmd = "python bench/run.py" + (" --quick" if quick else "")
    started = time.time()
    info = machine()
    base = Path(tempfile.mkdtemp(prefix="k3scluster-bench-"))
    try:
        render_rows, render_med = bench_render(base, render_sizes, runs)
        preview_rows, preview_notes = bench_preview(base, preview_sizes, runs)
        up_rows, overhead_rows = bench_up(base, up_sizes, runs)
        incr_rows = bench_incremental(base, incr_n, runs)
    finally:
        if args.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    total = time.time() - started
    info.append(("load average at the end", load_average()))

    big, mid = render_sizes[-1], render_sizes[-2]
    render_growth = render_med[big] / render_med[mid]
    lines = [
        "# Benchmarks",
        "",
        (
            f"Generated by `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{total / 60:.1f} min). Do not edit by hand: run the command again."
        ),
        "",
        "Every number is the **median of {runs} whole-process runs (min–max)**. Clusters are "
        "synthetic (`bench/gen.py`: N hosts in 10.64.0.0/10, each with a K3s agent, hosts 0–2 "
        "also run the three servers, host 0 the init-server; throw-away secrets marked as "
        "benchmark data). Every timed process runs inside `unshare -n` with only loopback up; "
        "nothing is contacted. Pulumi runs use the real engine (`.tools/bin/pulumi`), a file "
        "backend, runner `python` (this project's dynamic provider) and the recording colmena "
        "stand-in `tests/bin/colmena`.".replace("{runs}", str(runs)),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info),
        "",
        (
            "Run it with nothing else running (no tests, no builds); nothing here checks that "
            "but the load averages at the start and at the end. A min far below the median means "
            "something got in the way of the other runs; a ratio near its target can flip "
            "between runs."
        ),
        "",
        "## 1. Check + render",
        "",
        (
            "`python -m k3scluster render DIR --out OUT` (loads and checks the plans, renders every "
            "file, writes the tree atomically). CPU time in user mode and in the kernel, and peak "
            "memory (max RSS): of the process (`wait4`)."
        ),
        "",
        "| hosts | wall time | user | system | peak RSS |",
        "|---:|---:|---:|---:|---:|",
        *render_rows,
        "",
        f"Target: {big} hosts under 2 s — "
        + ("met" if render_med[big] < 2 else "**missed**")
        + f" ({render_med[big]:.2f} s); growth {big}/{mid} hosts = {render_growth:.2f}x time "
        + f"(linear would be {big / mid:.0f}x; target under 4.5x: "
        + ("met" if render_growth < 4.5 else "**missed**")
        + ").",
        "",
        (
            f"Reproduce: `python bench/gen.py /tmp/c {big} && {REPRO_PREFIX}python -m k3scluster "
            "render /tmp/c --out /tmp/c-out`"
        ),
        "",
        "## 2. `pulumi preview` against the engine floor",
        "",
        (
            "Ours: `pulumi preview --stack bench` of this project's program on a fresh stack (every "
            "resource a create). Floor: `bench/floor/__main__.py`, the same language host and "
            "engine, registering as many plain ComponentResources as our preview has components "
            "and as many dynamic-provider resources (a no-op provider, trivial inputs) as our "
            "preview has steps (the render and the deploys), and doing nothing else. The floor "
            "uses dynamic resources for the steps because they are what the engine and the "
            "dynamic-provider process pay for (a Check/Diff round trip each, a pickled provider in "
            "the inputs). Peak memory: the largest sampled sum of RSS of the whole process tree "
            "(engine, language host, program, dynamic provider), sampled every 50 ms."
        ),
        "",
        (
            "| hosts | components + steps (+stack) | ours | floor | ours/floor | floor with our "
            "step properties | ours/that | peak tree RSS ours | peak tree RSS floor |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *preview_rows,
        "",
        "Resource counts by type: " + "; ".join(preview_notes) + ".",
        "",
        (
            "Target: ours within 1.3x the floor at every N. The column \"floor with our step "
            "properties\" runs the floor again with its steps carrying properties shaped like our "
            "deploy steps (the colmena argv, the delete notice, and as many input digests as ours "
            "carry — what makes `pulumi preview --diff` name the changed input): the difference "
            "between the two floors is what carrying those properties costs the engine, and "
            "ours/that is what is left for our program."
        ),
        "",
        (
            "Reproduce (in a project directory made like `tests/test_pulumi_integration.py` makes "
            "one, after `source scripts/env.sh`): `python bench/gen.py /tmp/c 200`, stack config "
            "`k3scluster:clusterDir=/tmp/c`, `k3scluster:runner=python`, "
            f"`k3scluster:colmena={STANDIN.relative_to(ROOT)}`, then `{REPRO_PREFIX}pulumi preview "
            "--non-interactive`; the floor: `bench/floor` with `floor:components` / `floor:steps`."
        ),
        "",
        "## 3. `pulumi up`: the rolling deploy against its ideal and against colmena",
        "",
        (
            "`pulumi up --yes --skip-preview` on a fresh stack (gates off: `k3scluster:waitReady "
            "false`, no K3s behind the stand-in), the stand-in sleeping 1 s per host "
            "(`COLMENA_SLEEP=1`). The rolling order deploys the init-server's host, then each "
            "other server host alone, then the other hosts (each has an agent) in batches of "
            "`k3scluster:maxUnavailable`. *default*: `pulumi up` as it comes (engine "
            "`--parallel` 8, one provider process, `maxUnavailable` 1: one agent host at a time, "
            "the safe default). *wide*: `maxUnavailable` 10 (as many as the peer's `-p 10`), "
            "`--parallel 64` and `k3scluster:runnerProcesses` = 10/4 rounded up, so a whole "
            "batch runs at once. *one process*: as *wide* with "
            "`k3scluster:runnerProcesses 1` (the SDK's 4-request cap of one dynamic-provider "
            "process, as before). Ideal: *wide* with `COLMENA_SLEEP=0` (the overhead, table "
            "below) + 1 s per round (init + each server in turn + each batch of 10). "
            "Peer: the stand-in run as a careful colmena user would, in the same safe order: one "
            "`colmena apply switch --on <server host> -p 10` per server host, one after the "
            "other, then one call `--on <every other host> -p 10` (the stand-in, like colmena, "
            "works on up to 10 hosts of a call at once). One parallel call on every host would "
            "be faster and restart every etcd member together."
        ),
        "",
        (
            "| hosts | default | wide | one process | ideal | wide/ideal | peer: colmena, "
            "safe order | wide/peer |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *up_rows,
        "",
        "Target: *wide* within 1.5x of the ideal.",
        "",
        "### `up`'s own overhead",
        "",
        (
            "*wide* with the stand-in sleeping 0 s: everything `up` costs besides colmena's own "
            "work. Floor: `bench/floor` run with `pulumi up --yes --skip-preview --parallel 64` "
            "on a new stack, creating as many components and (no-op) dynamic-provider steps as "
            "ours: what the engine, the language host and the dynamic-provider process cost "
            "whatever the program does. Target: overhead under 1 s + 0.2 s per host."
        ),
        "",
        "| hosts | components + steps | overhead | target | floor `up` | overhead − floor |",
        "|---:|---:|---:|---:|---:|---:|",
        *overhead_rows,
        "",
        (
            f"Reproduce: as for 2., with `COLMENA_SLEEP=1 {REPRO_PREFIX}pulumi up --yes "
            "--skip-preview --non-interactive [--parallel 64]` on a new stack "
            "(`k3scluster:waitReady false`, `k3scluster:runnerProcesses N`, `k3scluster:maxUnavailable 10`); peer "
            "`COLMENA_SLEEP=1 tests/bin/colmena apply switch --on h0000 -f <render dir>/hive.nix "
            "-p 10`, then `--on h0001`, `--on h0002`, then `--on h0003,h0004,…`."
        ),
        "",
        f"## 4. Incremental: one changed host of {incr_n}",
        "",
        (
            f"After a full `up` of {incr_n} hosts (`COLMENA_SLEEP=1`): a run with nothing changed "
            f"against a run after appending a comment to `nixConfigs/{host_name(incr_n - 1)}.nix` "
            f"(the preview shows exactly `{host_name(incr_n - 1)}-deploy: update`, checked each time;"
            " its `up` runs colmena for that host: 1 s of stand-in sleep)."
        ),
        "",
        "| command | no change | one host changed |",
        "|---|---:|---:|",
        *incr_rows,
        "",
        (
            "Reproduce: as for 3., then edit one host's nixConfig and run `pulumi preview` / "
            "`pulumi up --yes --skip-preview`."
        ),
        "",
        "## Findings",
        "",
        "(from `bench/findings.md`, written by hand from the numbers of a full run)",
        "",
        FINDINGS.read_text() if FINDINGS.exists() else "(none yet)",
    ]
    out_path.write_text("\n".join(lines))
    progress(f"wrote {out_path} in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
