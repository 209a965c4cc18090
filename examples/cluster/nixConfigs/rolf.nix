# Extra NixOS configuration for the host rolf, which boots by BIOS: GRUB puts its boot code on
# the disk's MBR, so NixOS must be told which disk (the one with rolf's planned serial).
{ ... }:
{
  boot.loader.grub.device = "/dev/disk/by-id/ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567";
}
