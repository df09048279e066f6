#!/usr/bin/env bash
# RAW -> QCOW2 on the same 2 GiB image (about 25% data, ext4): `kiln convert --to qcow2` beside
# `qemu-img convert -O qcow2`. Both results are checked with `qemu-img compare` against the image.
# Goal: kiln <= 1.0x qemu-img.
#
# Then the OCI disk builder on the Debian bookworm image the tests use (tests/fixtures/
# make-debian-oci.sh; made here if missing, which needs root): `kiln build` from the OCI layout
# to a finished disk (blob verification, layer unpack, ESP, ext4 with owner/time fixups, bmap and
# sha256) beside what a user would do by hand for the root alone: `tar -xzf` of the same layer
# and a bare `mke2fs -d` of the tree. kiln does more than the reference here, so the ratio is an
# upper bound for the rootfs -> ext4 step. Goal: <= 1.2x.
#
# Usage: bench/disk.sh [WORKDIR]   needs hyperfine, qemu-utils, bmap-tools, e2fsprogs, fdisk
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$repo/target/bench}
mkdir -p "$work"
work=$(cd "$work" && pwd)
kiln=$repo/target/release/kiln
(cd "$repo" && cargo build --release --quiet)

img=$work/data-2G.img
bash "$repo/bench/make-data-image.sh" "$img"

hyperfine --runs 5 --warmup 1 --export-json "$work/disk.json" \
    -n kiln "'$kiln' convert '$img' --to qcow2 '$work/kiln.qcow2'" \
    -n qemu-img "qemu-img convert -O qcow2 '$img' '$work/qemu-img.qcow2'"

for s in kiln qemu-img; do
    qemu-img compare -q "$img" "$work/$s.qcow2" || { echo "$s output differs from the image" >&2; exit 1; }
done
qemu-img check -q "$work/kiln.qcow2"
python3 - "$work/disk.json" "$work/kiln.qcow2" "$work/qemu-img.qcow2" <<'PY'
import json, os, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"kiln convert      {r['kiln']:6.2f} s   {os.path.getsize(sys.argv[2]) >> 20} MiB")
print(f"qemu-img convert  {r['qemu-img']:6.2f} s   {os.path.getsize(sys.argv[3]) >> 20} MiB")
print(f"kiln/qemu-img = {r['kiln'] / r['qemu-img']:.2f} (goal <= 1.0); both compare equal to the image")
PY

# --- rootfs -> ext4 -------------------------------------------------------------------------
layout=$repo/target/kiln-test-cache/debian-oci
if [ ! -f "$layout/index.json" ]; then
    bash "$repo/tests/fixtures/make-debian-oci.sh" "$layout" "$repo/target/kiln-test-cache/debian-oci-work"
fi
layer=$(python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(d+"/blobs/sha256/"+m["layers"][0]["digest"][7:])' "$layout")
printf '[cluster]\nname = "b"\nseed = "b"\n[defaults]\nimage = "bootc-uefi-x86"\nbmc = { address = "redfish+http://127.0.0.1:1/redfish/v1/Systems/{name}", username = "u", password = { file = "pw" } }\n[[node]]\nname = "edge-1"\nboot_mac = "52:54:00:00:00:01"\n' > "$work/cluster.toml"
echo pw > "$work/pw"
size_mib=$(( $(du -sm --apparent-size "$layer" | cut -f1) * 4 + 1024 ))
hyperfine --runs 3 --export-json "$work/rootfs.json" \
    --prepare "rm -rf '$work/kc' '$work/kout' '$work/tree' '$work/mke2fs.img'" \
    -n kiln "KILN_CACHE_DIR='$work/kc' '$kiln' build -c '$work/cluster.toml' --node edge-1 --base 'oci:$layout:base' -o '$work/kout'" \
    -n "tar+mke2fs" "mkdir '$work/tree' && tar -xzf '$layer' -C '$work/tree' && mke2fs -q -F -t ext4 -d '$work/tree' '$work/mke2fs.img' ${size_mib}M"
e2fsck -fn "$work/mke2fs.img" >/dev/null
python3 - "$work/rootfs.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"kiln build (OCI layout -> disk)   {r['kiln']:6.2f} s")
print(f"tar -xzf + mke2fs -d (root only)  {r['tar+mke2fs']:6.2f} s")
print(f"kiln/(tar+mke2fs) = {r['kiln'] / r['tar+mke2fs']:.2f} (goal <= 1.2)")
PY
