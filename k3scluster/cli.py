"""The ``k3scluster`` command: init, check, render, build, boot-stick, vms, status, summary —
wiring only.

Every user mistake ends as a message and a hint on stderr with exit 1 (2 for a
wrong command line), never as a traceback; Ctrl-C ends with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from k3scluster.errors import Diagnostic, K3sClusterError
from k3scluster.init import init_cluster
from k3scluster.model import Cluster
from k3scluster.plans import load
from k3scluster.stackconfig import StackFile, StackLayout, stack_layout


def _version() -> str:
    try:
        return metadata.version("k3scluster")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="k3scluster",
        description="A bare-metal home cloud (NixOS + K3s) from a few CSV plans.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a cluster directory (plans, secrets, K3s token)")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument(
        "--agent-token",
        action="store_true",
        help="also add secrets/agent-token to a directory that already holds a cluster "
        '(read the README\'s "The agent token" first: not known to be safe while it runs)',
    )
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("check", help="check the plans; list every problem with FILE:LINE")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    _add_stack_args(
        s,
        "also check the change against what the Pulumi stack S deployed (K3s moves one "
        "minor release at a time)",
        required=False,
    )
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("render", help="write the NixOS configurations and a picture of the cluster")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--out", type=Path, metavar="OUT", help="default: DIR/.k3scluster/render")
    s.add_argument(
        "--vm-stack",
        metavar="STACK",
        help="render for the VM stack STACK (NICs named by the MACs of its VMs)",
    )
    s.add_argument(
        "--hold-agent",
        action="append",
        default=[],
        metavar="HOST=MINOR",
        help="also write servers-first/HOST.nix, a hive that keeps HOST's K3s agent at K3s "
        "MINOR (pulumi up passes it during a K3s minor upgrade: servers move first)",
    )
    s.set_defaults(func=cmd_render)

    s = sub.add_parser(
        "build",
        help="build every host's system with colmena (no host is contacted); "
        "say per host which packages its next deploy changes",
    )
    s.add_argument("dir", type=Path, metavar="DIR")
    _add_stack_args(
        s,
        "render and build as the Pulumi stack S does (Pulumi.S.yaml: its render "
        "directory, VM or hardware) and compare with what S deployed",
        required=False,
    )
    s.add_argument(
        "--on",
        nargs="+",
        action="extend",
        metavar="HOST",
        help="build only these hosts (default: every host)",
    )
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("boot-stick", help="write a host's installer image to a USB stick")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("host", metavar="HOST")
    s.add_argument("device", metavar="DEVICE")
    s.add_argument("--yes", action="store_true", help="do not ask before writing")
    s.add_argument("--image", type=Path, metavar="PATH", help="an already built installer image")
    s.add_argument(
        "--allow-non-removable",
        action="store_true",
        help="allow a device that is not removable (careful: it is wiped)",
    )
    s.set_defaults(func=cmd_boot_stick)

    s = sub.add_parser("vms", help="list a VM stack's VMs: state, IP, console log")
    s.add_argument("dir", type=Path, metavar="DIR")
    _add_stack_args(s, project=False)
    s.add_argument(
        "--render-dir", type=Path, metavar="R", help="the stack's k3scluster:renderDir, if set"
    )
    s.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    what = s.add_mutually_exclusive_group()
    what.add_argument(
        "--start", metavar="HOST", help="start HOST's installed VM from its disk (all: every VM)"
    )
    what.add_argument("--stop", metavar="HOST", help="power HOST's VM off (all: every VM)")
    s.set_defaults(func=cmd_vms)

    s = sub.add_parser(
        "status", help="each host at a glance: up to date, drift, K3s nodes Ready (read-only)"
    )
    s.add_argument("dir", type=Path, metavar="DIR")
    _add_stack_args(s)
    s.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    s.add_argument(
        "--offline",
        action="store_true",
        help="only the stack's record and the plans: contact no host and no API",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "summary", help="what `pulumi up` would do, host by host, from `pulumi preview --json`"
    )
    s.add_argument("dir", type=Path, metavar="DIR")
    _add_stack_args(s, "the Pulumi stack previewed", project=False)
    s.add_argument(
        "--preview",
        type=Path,
        default=Path("-"),
        metavar="FILE",
        help="the output of `pulumi preview --json` (default -: standard input)",
    )
    s.set_defaults(func=cmd_summary)
    return p


def _add_stack_args(
    s: argparse.ArgumentParser,
    stack_help: str = "the Pulumi stack",
    *,
    required: bool = True,
    project: bool = True,
) -> None:
    """--stack S, and with ``project`` --project P: where that stack's project is."""
    s.add_argument("--stack", required=required, metavar="S", help=stack_help)
    if project:
        s.add_argument(
            "--project",
            type=Path,
            metavar="P",
            help="the k3scluster project (Pulumi.yaml) of --stack; default: the current "
            "directory if it is one, else this checkout",
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except K3sClusterError as exc:
        print(f"k3scluster: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("k3scluster: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def cmd_init(args: argparse.Namespace) -> int:
    result = init_cluster(args.dir, add_agent_token=args.agent_token)
    for rel in result.created:
        print(f"created  {rel}")
    for rel in result.kept:
        print(f"kept     {rel} (exists, not touched)")
    for rel, why in result.held_back:
        print(f"not added {rel}: {why}")
    if result.created:
        print(
            f"next: edit {args.dir}/plans/*, add secrets/passwd and an ssh key "
            f"(secrets/<name>.pub), then run: k3scluster check {args.dir}"
        )
    elif not result.held_back:
        print("nothing to do: everything exists")
    return 0


def _summary(diags: Sequence[Diagnostic]) -> tuple[int, int]:
    errors = sum(1 for d in diags if d.is_error)
    return errors, len(diags) - errors


def _check_against_stack(
    cluster: Cluster, stack: str, project: Path | None
) -> tuple[str | None, list[str]]:
    """What is wrong with moving ``stack``'s deployed cluster to ``cluster`` (None: nothing),
    and what it cannot check."""
    from k3scluster import records
    from k3scluster.update_plan import check_k3s_step, unrecorded_warning

    resources = records.read_export(None, _project_dir(project), stack)
    steps = records.step_inputs(resources)
    versions = records.host_versions(
        steps, records.deployed_hosts(steps), records.deployed_hosts_of(resources)
    )
    warning = unrecorded_warning(cluster, versions)
    try:
        check_k3s_step(cluster, versions)
    except K3sClusterError as err:
        return str(err), []
    return None, [warning] if warning else []


def cmd_check(args: argparse.Namespace) -> int:
    result = load(args.dir)
    errors, warnings = _summary(result.diagnostics)
    against, stack_warnings = (
        _check_against_stack(result.cluster, args.stack, args.project)
        if args.stack and result.cluster is not None
        else (None, [])
    )
    if args.json:
        ok = result.ok and against is None
        out: dict[str, object] = {
            "ok": ok,
            "diagnostics": [d.to_json() for d in result.diagnostics],
        }
        if args.stack:
            out["stack"] = {"name": args.stack, "error": against, "warnings": stack_warnings}
        print(json.dumps(out, indent=2))
        return 0 if ok else 1
    for d in result.diagnostics:
        print(d)
    for w in stack_warnings:
        print(f"warning: stack {args.stack}: {w}")
    if against is not None:
        print(f"error: stack {args.stack}: {against}")
        return 1
    if result.cluster is not None:
        c = result.cluster
        print(
            f"ok: {len(c.hosts)} host(s), {len(c.k3s)} K3s node(s)"
            + (f", {warnings} warning(s)" if warnings else "")
        )
        return 0
    print(f"{errors} error(s), {warnings} warning(s) in {args.dir}")
    return 1


def _load_for_command(root: Path) -> Cluster | None:
    """The cluster, with warnings on stderr; None (diagnostics on stderr) on errors."""
    result = load(root)
    for d in result.diagnostics:
        print(d, file=sys.stderr)
    if result.cluster is None:
        errors, warnings = _summary(result.diagnostics)
        print(
            f"{errors} error(s), {warnings} warning(s) in {root}: run `k3scluster check {root}`",
            file=sys.stderr,
        )
    return result.cluster


def _default_render_dir(root: Path) -> Path:
    return root / ".k3scluster" / "render"


def _render(
    cluster: Cluster,
    out: Path,
    vm_stack: str | None,
    held_agents: dict[str, str] | None = None,
    carry: Sequence[str] = (),
) -> dict[str, str]:
    """The render of ``k3scluster render`` (and of a stack's render step): for a VM stack
    with the NIC names of its VMs. Notices (no Graphviz) go to stderr."""
    from k3scluster.render import render_to_dir

    notices: list[str] = []
    vm = None
    if vm_stack:
        from k3scluster.lab.spec import vm_render

        vm = vm_render(cluster, vm_stack, out)
    written = render_to_dir(cluster, out, notices, vm, held_agents, carry)
    for notice in notices:
        print(f"k3scluster: {notice}", file=sys.stderr)
    return written


def _held_agents(cluster: Cluster, given: list[str]) -> dict[str, str] | None:
    """``--hold-agent HOST=MINOR`` values; None (after printing why) when one is wrong."""
    from k3scluster.pins import parse_k3s_minor

    held: dict[str, str] = {}
    for item in given:
        host, _, minor = item.partition("=")
        parsed = parse_k3s_minor(minor)
        if parsed is None or cluster.agent_on(host) is None:
            print(
                f"error: --hold-agent {item!r}: want HOST=MINOR, a host with a K3s agent in "
                "the plans and a K3s minor release (1.34)",
                file=sys.stderr,
            )
            return None
        held[host] = parsed
    return held


def cmd_render(args: argparse.Namespace) -> int:
    # a stack's render step passes the paths as the stack file writes them (stackpaths.py)
    args.dir = args.dir.expanduser()
    args.out = args.out.expanduser() if args.out is not None else None
    cluster = _load_for_command(args.dir)
    if cluster is None:
        return 1
    out = args.out if args.out is not None else _default_render_dir(args.dir)
    held = _held_agents(cluster, args.hold_agent)
    if held is None:
        return 1
    written = _render(cluster, out, args.vm_stack, held)
    for rel in sorted(written):
        print(f"wrote    {rel}")
    print(f"rendered {len(written)} file(s) into {out}")
    return 0


def _project_dir(given: Path | None) -> Path:
    """The k3scluster project whose stack files ``--stack`` reads."""
    if given is not None:
        return given.resolve()
    checkout = Path(__file__).resolve().parent.parent
    for candidate in (Path.cwd(), checkout):
        if (candidate / "Pulumi.yaml").is_file() and (candidate / "__main__.py").is_file():
            return candidate.resolve()
    raise K3sClusterError(
        "no k3scluster project (Pulumi.yaml) in the current directory",
        hint="run it in your k3scluster checkout, or give --project DIR",
    )


def _build_layout(args: argparse.Namespace) -> tuple[StackLayout, Path | None]:
    """Where and how to build: the stack's layout with --stack, else the plain render's."""
    root = args.dir.resolve()
    if not args.stack:
        return StackLayout("", root, _default_render_dir(args.dir).resolve(), "colmena",
                           "nix", False), None
    project = _project_dir(args.project)
    layout = stack_layout(StackFile(project, args.stack), args.stack, project)
    if layout.cluster_dir != root:
        raise K3sClusterError(
            f"stack {args.stack} deploys the cluster {layout.cluster_dir}, not {root}",
            hint=f"k3scluster build {layout.cluster_dir} --stack {args.stack}",
        )
    return layout, project


def _say(message: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(f"k3scluster: {message}", file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from k3scluster import build
    from k3scluster.render import SERVERS_FIRST_DIR

    cluster = _load_for_command(args.dir)
    if cluster is None:
        return 1
    layout, project = _build_layout(args)
    names = [h.name for h in cluster.hosts]
    hosts = [n for item in (args.on or names) for n in item.split(",") if n]
    unknown = sorted(set(hosts) - set(names))
    if unknown:
        raise K3sClusterError(
            f"--on: no host {', '.join(unknown)} in {args.dir}/plans/hosts.csv",
            hint=f"the hosts are: {', '.join(names)}",
        )
    hosts = list(dict.fromkeys(hosts))
    kind = f"VM stack {layout.stack}" if layout.vms else (
        f"stack {layout.stack}" if layout.stack else "no stack")
    _say(f"rendering {args.dir} into {layout.render_dir} ({kind})")
    # the stack's servers-first hives (a K3s minor upgrade under way) stay: build cannot make
    # them (they need the stack's records), and the next up's render step, unchanged, would not
    _render(cluster, layout.render_dir, layout.vm_stack, carry=(SERVERS_FIRST_DIR,))
    _say(f"building {len(hosts)} host(s) with colmena (no host is contacted): "
        f"{', '.join(hosts)}")
    code, results = build.build_hosts(layout.colmena, layout.render_dir, hosts)
    for line in build.result_lines(results, code, layout.render_dir):
        print(line)
    built = [(r.host, r.system) for r in results if r.system is not None]
    if built and project is not None:
        _say(f"reading what stack {layout.stack} deployed (pulumi stack output)")
        deployed = build.deployed_systems(project, layout.stack)
        print(f"what the next deploy of stack {layout.stack} changes:")
        for line in build.changes_lines(layout.nix, built, deployed):
            print(f"  {line}")
    failed = [r.host for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(hosts)} host(s) failed to build: {', '.join(failed)}")
    return 1 if failed or code != 0 else 0


def cmd_boot_stick(args: argparse.Namespace) -> int:
    cluster = _load_for_command(args.dir)
    if cluster is None:
        return 1
    from k3scluster.bootstick import boot_stick

    boot_stick(
        cluster,
        args.host,
        args.device,
        yes=args.yes,
        image=args.image,
        allow_non_removable=args.allow_non_removable,
    )
    return 0


def cmd_vms(args: argparse.Namespace) -> int:
    from k3scluster.lab import ctl
    from k3scluster.lab.spec import VmSpec, lab_dir
    from k3scluster.stackpaths import resolve

    render_dir = args.render_dir or args.dir / ".k3scluster" / args.stack
    lab = resolve(lab_dir(render_dir))  # a spec names its directory relative to the project
    host = args.start or args.stop
    if host:
        names = [r["host"] for r in ctl.list_vms(lab)] if host == "all" else [host]
        for name in names:
            m = ctl.read_manifest(lab / name)
            if m is None or "spec" not in m:
                raise K3sClusterError(
                    f"stack {args.stack} has no VM {name!r} in {lab}",
                    hint=f"k3scluster vms {args.dir} --stack {args.stack} lists them",
                )
            spec = VmSpec(**m["spec"]).here(lab / name)
            (ctl.vm_start if args.start else ctl.vm_stop)(spec)
        return 0
    rows = ctl.list_vms(lab)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no VMs of stack {args.stack} in {lab}")
        return 0
    cols = ("host", "state", "ip", "mac", "console")
    table = [cols] + [tuple(str(r[c]) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


STATUS_ATTENTION = 3  # exit status of `status` when a host needs attention


def cmd_status(args: argparse.Namespace) -> int:
    from k3scluster import probe, stackinfo, status

    cluster = _load_for_command(args.dir)
    if cluster is None:
        return 1
    project = _project_dir(args.project)
    info = stackinfo.resolve(
        StackFile(project, args.stack),
        args.stack,
        project,
        stackinfo.read_outputs(args.stack, project),
    )
    if info.layout.cluster_dir != cluster.root.resolve():
        raise K3sClusterError(
            f"stack {args.stack} deploys {info.layout.cluster_dir}, not {args.dir}",
            hint=f"k3scluster status {info.layout.cluster_dir} --stack {args.stack}",
        )
    if not info.hosts:
        raise K3sClusterError(
            f"stack {args.stack} records no hosts: it was never deployed",
            hint="pulumi preview --diff shows what `pulumi up` would do",
        )
    planned = status.planned_digests(cluster, info.layout.render_dir, info.layout.vm_stack)
    observed = nodes = None
    notes: list[str] = []
    if not args.offline:
        observed = probe.observe_hosts(cluster, info.ssh)
        nodes, notes = probe.k3s_nodes(cluster, info.kubeconfig)
    if args.offline and info.needs_reboot is None:
        notes.append("offline, and the stack records no reboot list: REBOOT not known")
    rows = status.host_statuses(
        cluster,
        planned,
        info.hosts,
        observed=observed,
        nodes=nodes,
        needs_reboot=info.needs_reboot,
    )
    if args.json:
        print(json.dumps(status.to_json(args.stack, cluster.root, rows), indent=2))
    else:
        sys.stdout.write(status.format_table(args.stack, rows, notes))
    return STATUS_ATTENTION if status.needs_attention(rows) else 0


def cmd_summary(args: argparse.Namespace) -> int:
    from k3scluster.summary import summarize

    cluster = _load_for_command(args.dir)
    if cluster is None:
        return 1
    where = "standard input" if str(args.preview) == "-" else str(args.preview)
    try:
        text = sys.stdin.read() if str(args.preview) == "-" else args.preview.read_text()
        preview = json.loads(text)
    except OSError as err:
        raise K3sClusterError(f"cannot read {where}: {err.strerror}") from None
    except json.JSONDecodeError:
        raise K3sClusterError(
            f"{where} is not the JSON of `pulumi preview --json`",
            hint="pulumi preview --json --stack S > preview.json",
        ) from None
    if not isinstance(preview, dict):
        raise K3sClusterError(f"{where} is not the JSON of `pulumi preview --json`")
    sys.stdout.write(summarize(args.stack, cluster, preview))
    return 0


if __name__ == "__main__":
    sys.exit(main())
