#!/bin/sh
# PID 1 of the k3scluster test guest (built by tests/vmguest.py; a test stand-in, not a product).
#
# Mounts the kernel file systems, loads the virtio/vfat/CD modules, runs udev (for
# /dev/disk/by-id), reports what it sees to the console, brings up the NIC that has the
# planned MAC with the planned address, then runs its job:
#   install  run the host's rendered system-setup.sh (SKIP_INSTALL=1) against the disk it
#            finds by serial, make the disk an "installed system" (kernel, initrd and GRUB
#            carried in this initrd, the marks of an installed NixOS), report the layout,
#            power off
#   serve    answer ping at the planned address until the power button (QMP system_powerdown)
#            or the console command "poweroff"
#   facts    report and power off
# Every line meant for the tests starts with "K3SGUEST " (see vmguest.parse_facts).
# The per-host values come from /etc/k3sguest/config (an extra cpio appended to the initrd);
# "k3sguest.job=JOB" on the kernel command line overrides its JOB.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /mnt
mount -t devpts devpts /dev/pts
ln -s /proc/self/fd /dev/fd
ln -s fd/0 /dev/stdin
ln -s fd/1 /dev/stdout
ln -s fd/2 /dev/stderr
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

say() { echo "K3SGUEST $*"; }
off() {
  say "poweroff $*"
  sync
  /usr/bin/umount -R /mnt 2>/dev/null
  poweroff -f
}

HOST="" IP="" GATEWAY="" MAC="" SERIAL="" JOB=facts BOOT="" SETUP_ARGS="" POWEROFF_ON_FAILURE=0
# shellcheck disable=SC1091
[ -f /etc/k3sguest/config ] && . /etc/k3sguest/config
read -r cmdline </proc/cmdline
for word in $cmdline; do
  case "$word" in
    k3sguest.job=*) JOB="${word#k3sguest.job=}" ;;
  esac
done
say "boot host=${HOST:-?} job=$JOB firmware=$([ -d /sys/firmware/efi ] && echo efi || echo bios)"

for m in virtio_pci virtio_blk virtio_net virtio_rng vfat nls_cp437 nls_ascii nls_iso8859-1 \
  button evdev; do
  modprobe "$m" || say "error modprobe $m"
done

/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=60 || say "error udevadm settle timed out"

facts() {
  for b in /sys/block/vd*; do
    [ -e "$b" ] || continue
    say "disk /dev/${b##*/} serial=$(cat "$b/serial" 2>/dev/null)"
  done
  for l in /dev/disk/by-id/virtio-*; do
    [ -e "$l" ] || continue
    say "byid ${l##*/} /dev/$(readlink "$l" | sed 's,.*/,,')"
  done
  for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] && continue
    say "nic ${n##*/} mac=$(cat "$n/address")"
  done
}
facts

# The NIC with the planned MAC gets the planned address.
IFACE=""
if [ -n "$MAC" ]; then
  want=$(echo "$MAC" | tr '[:upper:]' '[:lower:]')
  for n in /sys/class/net/*; do
    [ "$(cat "$n/address")" = "$want" ] && IFACE="${n##*/}"
  done
  if [ -z "$IFACE" ]; then
    say "error no NIC has the MAC $want"
  fi
elif [ -n "$IP" ]; then
  # no MAC to expect: the one NIC there is
  for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] || IFACE="${n##*/}"
  done
fi
ip link set lo up
if [ -n "$IFACE" ] && [ -n "$IP" ]; then
  ip link set "$IFACE" up
  ip addr add "$IP" dev "$IFACE"
  [ -n "$GATEWAY" ] && ip route add default via "$GATEWAY" dev "$IFACE"
  say "net $IFACE ip=$IP gateway=${GATEWAY:-none}"
fi

# The power button (QMP system_powerdown) powers the guest off.
for e in /sys/class/input/event*; do
  [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
  (dd if="/dev/input/${e##*/}" bs=24 count=1 of=/dev/null 2>/dev/null && off "power button") &
done

# Prints the partition table and file systems of the install disk.
layout() {
  disk="$1"
  parted -s -m "$disk" unit MiB print 2>/dev/null | sed "s,^,K3SGUEST parted ,"
  for p in "$disk"[0-9]*; do
    [ -b "$p" ] || continue
    say "blkid $p $(blkid -p -o export "$p" | grep -E '^(TYPE|LABEL|PART_ENTRY_NAME)=' | tr '\n' ' ')"
  done
}

# Writes the number $3 as 8 little-endian bytes at byte offset $2 of the file $1.
put_le64() {
  n="$3" esc="" i=0
  while [ "$i" -lt 8 ]; do
    esc="$esc\\$(printf '%03o' $((n & 255)))"
    n=$((n >> 8)) i=$((i + 1))
  done
  # shellcheck disable=SC2059
  printf "$esc" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
}

install_system() {
  root="$1"
  mkdir -p "$root/boot" "$root/etc" "$root/nix/store" "$root/nix/var/nix/profiles"
  # the installed system's kernel and initrd travel in the installer's initrd (no CD
  # driver needed: the Debian cloud kernel has no AHCI for a q35 machine's CD drive)
  if [ -f /usr/share/k3sguest/disk/vmlinuz ]; then
    cp /usr/share/k3sguest/disk/vmlinuz /usr/share/k3sguest/disk/initrd.img "$root/boot/"
  else
    say "error this initrd carries no system for the disk (build it with guest_iso)"
  fi
  cat >"$root/boot/k3sguest.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry "k3sguest $HOST (installed)" {
  linux /boot/vmlinuz console=ttyS0,115200 panic=-1 k3sguest.job=serve
  initrd /boot/initrd.img
}
EOF
  if [ "$BOOT" = efi ]; then
    # the ESP is mounted at $root/boot: GRUB finds it by its label "boot", files at its top
    sed -i 's, /boot/, /,' "$root/boot/k3sguest.cfg"
    mkdir -p "$root/boot/EFI/BOOT"
    cp /usr/share/k3sguest/BOOTX64.EFI "$root/boot/EFI/BOOT/BOOTX64.EFI"
  else
    # GPT: boot.img in the MBR's code area, core.img in the BIOS boot partition (partition
    # 1), both patched where grub-install patches them: boot.img's kernel sector (offset
    # 0x5c) and the blocklist start at the end of core.img's first sector (offset 0x1f4)
    start="$(cat "/sys/class/block/${DISK##*/}1/start")"
    cp /usr/share/k3sguest/boot.img /usr/share/k3sguest/core.img /tmp/
    put_le64 /tmp/boot.img 92 "$start"
    put_le64 /tmp/core.img 500 $((start + 1))
    dd if=/tmp/boot.img of="$DISK" bs=440 count=1 conv=notrunc 2>/dev/null
    dd if=/tmp/core.img of="$DISK" bs=512 seek="$start" conv=notrunc 2>/dev/null
  fi
  # what an installed NixOS leaves on its root file system
  echo "k3sguest $HOST" >"$root/etc/NIXOS"
  # its ssh host key (made once, as NixOS's sshd does on its first start) and the hardware
  # configuration nixos-generate-config writes in a QEMU guest
  mkdir -p "$root/etc/ssh" "$root/etc/nixos"
  ssh-keygen -q -t ed25519 -N "" -C "k3sguest-$HOST" -f "$root/etc/ssh/ssh_host_ed25519_key" ||
    say "error ssh-keygen"
  uuid="$(blkid -s UUID -o value "$(findmnt -n -o SOURCE "$root")")"
  {
    echo "# Do not modify this file!  It was generated by the k3scluster test guest,"
    echo "# as nixos-generate-config does in a QEMU guest."
    echo "{ config, lib, pkgs, modulesPath, ... }:"
    echo "{"
    echo "  imports = [ (modulesPath + \"/profiles/qemu-guest.nix\") ];"
    echo "  boot.initrd.availableKernelModules = [ \"ata_piix\" \"uhci_hcd\" \"virtio_pci\" \"virtio_blk\" ];"
    echo "  fileSystems.\"/\" = { device = \"/dev/disk/by-uuid/$uuid\"; fsType = \"ext4\"; };"
    echo "}"
  } >"$root/etc/nixos/hardware-configuration.nix"
  say "hardware root=$uuid"
  mkdir -p "$root/nix/store/00000000000000000000000000000000-nixos-system-$HOST"
  ln -sfn "/nix/store/00000000000000000000000000000000-nixos-system-$HOST" \
    "$root/nix/var/nix/profiles/system"
  sync
}

# The installed system's sshd: its host key and /etc/nixos from the disk (label nixos).
start_sshd() {
  mkdir -p /sysroot /run/sshd /etc/nixos
  chmod 0755 /run/sshd
  if ! mount -o ro /dev/disk/by-label/nixos /sysroot; then
    say "error no installed root file system to read the ssh host key from"
    return
  fi
  cp /sysroot/etc/ssh/ssh_host_ed25519_key /sysroot/etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/
  cp /sysroot/etc/nixos/hardware-configuration.nix /etc/nixos/ 2>/dev/null
  /usr/bin/umount /sysroot
  chmod 0600 /etc/ssh/ssh_host_ed25519_key
  if /usr/sbin/sshd -E /tmp/sshd.log; then
    say "sshd $(ssh-keygen -l -f /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)"
  else
    say "error sshd did not start: $(tail -n 3 /tmp/sshd.log)"
  fi
}

case "$JOB" in
  install)
    say "job install start"
    rc=0
    # as the ISO's system_setup.service runs it (POWEROFF_ON_FAILURE from installer.json):
    # after a failure the script prints its FAILED line and powers off only when asked to
    export POWEROFF="poweroff -f" POWEROFF_ON_FAILURE
    # shellcheck disable=SC2086
    bash /etc/k3sguest/system-setup.sh SKIP_INSTALL=1 $SETUP_ARGS || rc=$?
    say "setup rc=$rc"
    DISK=""
    for b in /sys/block/vd*; do
      [ "$(tr '[:upper:]' '[:lower:]' <"$b/serial" 2>/dev/null)" = "$(echo "$SERIAL" | tr '[:upper:]' '[:lower:]')" ] &&
        DISK="/dev/${b##*/}"
    done
    if [ "$rc" = 0 ] && /usr/bin/mountpoint -q /mnt; then
      install_system /mnt
      /usr/bin/umount -R /mnt
      say "installed $DISK"
    fi
    [ -n "$DISK" ] && layout "$DISK"
    say "job install done rc=$rc"
    if [ "$rc" != 0 ]; then
      # the real image stays up after a failed system_setup (its service failed; the
      # script powered off already if POWEROFF_ON_FAILURE asked it to): so does this one
      while :; do sleep 3600; done
    fi
    # the end of system-setup.sh after nixos-install (SKIP_INSTALL=1 stopped before it)
    echo "k3scluster-install: OK host=$HOST"
    off "after install"
    ;;
  serve)
    start_sshd
    say "serving ${IP:-no address}"
    while read -r line; do
      case "$line" in
        poweroff) off "console command" ;;
        facts) facts ;;
      esac
    done </dev/console
    # no console input (a plain file or none): wait for the power button
    while :; do sleep 3600; done
    ;;
  *)
    off "job $JOB done"
    ;;
esac
