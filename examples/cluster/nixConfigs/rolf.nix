# Extra NixOS configuration for the host rolf, which boots by BIOS. GRUB's disk needs nothing
# here: the plan's disk serial names it (a udev rule links it as /dev/k3scluster-bootdisk, and
# GRUB defaults to that). A device set here wins, for example:
#   boot.loader.grub.device = "/dev/disk/by-id/ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567";
{ ... }:
{
  time.timeZone = "Europe/Berlin";
}
