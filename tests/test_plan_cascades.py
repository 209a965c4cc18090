"""The subnet in doubt: when the gateway or netmask, not the addresses, is wrong (plans/subnet.py).

The cases in tests/cases/plans/cases.py show the diagnostics on the example; these properties
check the decision itself over random subnets.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from k3scluster.plans.subnet import subnet_cause

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network


@st.composite
def subnet_and_hosts(draw: st.DrawFn) -> tuple[N, A, list[A]]:
    prefix = draw(st.integers(min_value=16, max_value=28))
    net = N((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
    size = net.num_addresses - 2
    offsets = draw(st.lists(st.integers(1, size), min_size=3, max_size=12, unique=True))
    gateway, *hosts = (net.network_address + o for o in offsets)
    return net, gateway, hosts


@given(subnet_and_hosts())
def test_a_sound_plan_has_no_cause(plan: tuple[N, A, list[A]]) -> None:
    net, gateway, hosts = plan
    assert subnet_cause(gateway, net, hosts) is None


@given(subnet_and_hosts(), st.integers(min_value=1, max_value=2**16 - 1))
def test_a_gateway_in_another_subnet_is_the_cause(plan: tuple[N, A, list[A]], shift: int) -> None:
    net, gateway, hosts = plan
    # 1 to 2**16 - 1 subnets of the same size away (a /16 or narrower: never round to net)
    other = N(((int(net.network_address) + shift * net.num_addresses) % 2**32, net.prefixlen))
    wrong = other.network_address + (int(gateway) - int(net.network_address))
    cause = subnet_cause(wrong, other, hosts)
    assert cause is not None and cause.key == "gateway" and cause.subnet == net
    assert cause.sharing == cause.total == len(hosts)


@given(subnet_and_hosts(), st.integers(min_value=1, max_value=6))
def test_a_netmask_too_narrow_is_the_cause_when_most_are_outside(
    plan: tuple[N, A, list[A]], narrower: int
) -> None:
    net, gateway, hosts = plan
    narrow = N((gateway, min(net.prefixlen + narrower, 30)), strict=False)
    outside = [h for h in hosts if h not in narrow]
    cause = subnet_cause(gateway, narrow, hosts)
    if len(outside) < 2 or 2 * len(outside) <= len(hosts):
        assert cause is None  # a few addresses outside are reported row by row
    elif net.prefixlen >= 24 and any(h in narrow for h in hosts):
        assert cause is not None and cause.key == "netmask"
        # the wider subnet it proposes holds the gateway and every address, none of them
        # its network or broadcast address, and is no wider than the true one
        assert cause.subnet.prefixlen >= net.prefixlen
        assert gateway in cause.subnet and all(h in cause.subnet for h in hosts)
        ends = {cause.subnet.network_address, cause.subnet.broadcast_address}
        assert not ends & {gateway, *hosts}


def test_rows_of_their_own_stay_rows() -> None:
    """Half the addresses elsewhere, the rest with the gateway: the rows are wrong, not the net."""
    net = N("10.0.100.0/24")
    hosts = [A("10.0.100.2"), A("10.0.100.3"), A("10.0.200.2"), A("10.0.200.3")]
    assert subnet_cause(A("10.0.100.1"), net, hosts) is None
    # one host alone outside is its row's error, whatever the gateway
    assert subnet_cause(A("10.0.100.1"), net, [A("10.0.100.2"), A("10.0.7.2")]) is None
