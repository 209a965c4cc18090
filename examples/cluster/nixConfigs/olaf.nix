# Extra NixOS configuration for the host olaf (merged into its system).
{ config, lib, pkgs, ... }:
{
  time.timeZone = "Europe/Berlin";
  # Plan data is readable here without declaring options:
  # the "location" column of hosts.csv for this host.
  environment.etc."k3scluster-location".text = config.cluster.olaf.location;
}
