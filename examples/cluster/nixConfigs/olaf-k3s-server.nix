# Extra configuration inside the K3s server container of olaf.
{ config, lib, pkgs, ... }:
{
  environment.systemPackages = [ pkgs.kubectl ];
}
