#!/usr/bin/env bash
# Makes a HypriotOS-sized base for benchmarks: 1.3 GB, HypriotOS 1.12.3's layout (64 MiB FAT16
# "HypriotOS" at sector 2048, ext4 root after it), with about 900 MB of incompressible data in
# the root, as a real card image has. Usage: make-hypriot-base.sh OUT.img
set -euo pipefail
out=$1
work=$(mktemp -d "$(dirname "$out")/.base-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
boot_mib=64
root_mib=1180
truncate -s $((1 + boot_mib + root_mib))M "$out.tmp"
sfdisk --quiet "$out.tmp" <<SFDISK
label: dos
start=2048, size=$((boot_mib * 2048)), type=c
start=$((2048 + boot_mib * 2048)), size=$((root_mib * 2048)), type=83
SFDISK
mkfs.vfat -F 16 -n HypriotOS -C "$work/boot.fat" $((boot_mib * 1024)) >/dev/null
printf 'hdmi_force_hotplug=1\n' > "$work/config.txt"
printf 'root=/dev/mmcblk0p2 rootwait\n' > "$work/cmdline.txt"
head -c 20M /dev/urandom > "$work/kernel7.img"
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.fat" "$work/config.txt" "$work/cmdline.txt" "$work/kernel7.img" ::/
dd if="$work/boot.fat" of="$out.tmp" bs=1M seek=1 conv=notrunc,sparse status=none
mkdir -p "$work/root/usr/lib"
for i in $(seq 1 9); do head -c 100M /dev/urandom > "$work/root/usr/lib/blob$i"; done
mkfs.ext4 -q -L root -d "$work/root" "$work/root.ext4" ${root_mib}M
dd if="$work/root.ext4" of="$out.tmp" bs=1M seek=$((1 + boot_mib)) conv=notrunc status=none
mv "$out.tmp" "$out"
