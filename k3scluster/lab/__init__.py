"""The VM lab of a VM stack (``k3scluster:vms true``): pure helpers, no pulumi.

- ``spec``: stack settings, per-host specs, names of bridge, taps and files;
- ``netcheck``: refuse a plan subnet that overlaps a route or address of this machine;
- ``qemu``: firmware lookup, the KVM probe, qemu-img and qemu-system argv;
- ``ctl``: what the steps run (``python -m k3scluster.lab.ctl …``): network up/down,
  VM up/stop/start/delete, the listing behind ``k3scluster vms``.

The Pulumi side is ``k3scluster.components.vm``.
"""
