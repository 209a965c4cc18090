"""After a deploy, a host whose kernel, initrd or kernel parameters differ from the booted
system's is listed in the stack output ``needsReboot`` and in the warning the run ends with.

The real engine runs ``pulumi up`` of the example cluster against the lab of
tests/test_health.py (a real sshd per host in network and mount namespaces of the test's own,
the K3s API stand-in, the colmena stand-in). Each host's ``/run/booted-system`` and
``/run/current-system`` are stand-in system directories (kernel and initrd links, a
kernel-params file): on ulrich the current system's kernel is another than the booted one's,
as after a switch to a new NixOS release; olaf runs the system it booted. No packet leaves
the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_health import Lab, Project, new_lab, system_dir

from k3scluster.bootentries import hosts_needing_reboot, reboot_warning
from k3scluster.records import DEPLOYED_PREFIX, last_json


def test_hosts_needing_reboot_lists_hosts_whose_record_names_a_changed_boot_entry() -> None:
    records = {
        "ulrich": {"system": "/nix/store/a", "reboot": ["kernel", "initrd"]},
        "olaf": {"system": "/nix/store/b", "reboot": []},
        "karl": {"system": "/nix/store/c", "reboot": None},  # could not tell
        "rolf": {"system": "/nix/store/d"},  # deployed before the record said
        "ulf": None,  # no deploy record (waitReady false, or failed)
        "anna": {"reboot": ["kernel-params"]},
    }
    assert hosts_needing_reboot(records) == ["anna", "ulrich"]
    assert hosts_needing_reboot({}) == []


def test_reboot_warning_names_each_host_and_how_to_reboot_it() -> None:
    assert reboot_warning([], {"olaf": "10.0.100.2"}) is None
    text = reboot_warning(["anna", "ulrich"], {"anna": "10.0.0.9", "ulrich": "10.0.100.6"})
    assert text is not None
    assert "2 host(s) need a reboot" in text and "anna, ulrich" in text
    assert "ssh root@10.0.0.9 systemctl reboot; ssh root@10.0.100.6 systemctl reboot" in text
    assert "one at a time" in text and "kubectl drain" in text and "needsReboot" in text


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


@pytest.mark.integration
@pytest.mark.root
def test_up_lists_the_host_whose_kernel_changed_in_needs_reboot_and_warns(
    lab: Lab, tmp_path: Path
) -> None:
    systems = tmp_path / "systems"
    systems.mkdir()
    old, new = system_dir(systems, "old", "kernel-6.6"), system_dir(systems, "new", "kernel-6.12")
    same = system_dir(systems, "same", "kernel-6.6-olaf")
    # ulrich booted the old system and was switched to one with another kernel
    (lab.hosts["ulrich"] / "run" / "booted-system").symlink_to(old)
    lab.repoint("ulrich", str(new))
    # olaf runs the system it booted
    (lab.hosts["olaf"] / "run" / "booted-system").symlink_to(same)
    lab.repoint("olaf", str(same))

    p = Project(tmp_path, lab)
    r = p.up()
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:] + lab.sshd_logs()[-3000:]

    assert p.outputs()["needsReboot"] == ["ulrich"]
    # each deploy step's result keeps what it saw (olaf: nothing changed since it booted)
    assert last_json(p.step_state("ulrich-deploy")["outputs"]["stdout"],
                     DEPLOYED_PREFIX)["reboot"] == ["kernel"]
    assert last_json(p.step_state("olaf-deploy")["outputs"]["stdout"], DEPLOYED_PREFIX)[
        "reboot"] == []
    flat = " ".join(text.split())
    assert "1 host(s) need a reboot to run their new kernel, initrd or kernel parameters: " \
           "ulrich." in flat
    assert "ssh root@10.0.100.6 systemctl reboot" in flat
    assert "ssh root@10.0.100.2" not in flat  # olaf needs none
