#!/usr/bin/env bash
# RAW -> QCOW2 on the same 2 GiB image (about 25% data, ext4): `kiln convert --to qcow2` beside
# `qemu-img convert -O qcow2`. Both results are checked with `qemu-img compare` against the image.
# Goal: kiln <= 1.0x qemu-img.
#
# Then the OCI disk builder on the Debian bookworm image the tests use (tests/fixtures/
# make-debian-oci.sh; made here if missing, which needs root): the rootfs -> ext4 step of
# `kiln build` (mke2fs -d and kiln's debugfs fixups, as kiln times it) beside a bare `mke2fs -d`
# of the same tree into a partition of the same size. Goal: <= 1.2x. The layer unpack is shown
# beside `tar -xzf` too.
#
# Usage: bench/disk.sh [WORKDIR]   needs hyperfine, qemu-utils, bmap-tools, e2fsprogs, fdisk
set -euo pipefail
source "$(dirname "$0")/common.sh"

img=$work/data-2G.img
bash "$repo/bench/make-data-image.sh" "$img"

# kiln's output is on disk when it exits (fsync before the rename into place); qemu-img leaves
# its output in the page cache. So the fair peer is qemu-img followed by `sync FILE`, and every
# run starts with nothing dirty (`--prepare sync`). The bare qemu-img time is printed too.
hyperfine --runs 10 --warmup 2 --prepare sync --export-json "$work/disk.json" \
    -n kiln "'$kiln' convert '$img' --to qcow2 '$work/kiln.qcow2'" \
    -n qemu-img+sync "qemu-img convert -O qcow2 '$img' '$work/qemu-img.qcow2' && sync '$work/qemu-img.qcow2'" \
    -n qemu-img "qemu-img convert -O qcow2 '$img' '$work/qemu-img.qcow2'"

for s in kiln qemu-img; do
    qemu-img compare -q "$img" "$work/$s.qcow2" || { echo "$s output differs from the image" >&2; exit 1; }
done
qemu-img check -q "$work/kiln.qcow2"
python3 - "$work/disk.json" "$work/kiln.qcow2" "$work/qemu-img.qcow2" <<'PY'
import json, os, sys
# Medians: a single stall of the VM's disk should not decide the ratio.
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"medians of 10 runs")
print(f"kiln convert (output synced)      {r['kiln']:6.2f} s   {os.path.getsize(sys.argv[2]) >> 20} MiB")
print(f"qemu-img convert + sync FILE      {r['qemu-img+sync']:6.2f} s   {os.path.getsize(sys.argv[3]) >> 20} MiB")
print(f"qemu-img convert (page cache)     {r['qemu-img']:6.2f} s")
print(f"kiln/(qemu-img + sync) = {r['kiln'] / r['qemu-img+sync']:.2f} (goal <= 1.0); "
      f"kiln/bare qemu-img = {r['kiln'] / r['qemu-img']:.2f}; both compare equal to the image")
PY

# --- rootfs -> ext4 -------------------------------------------------------------------------
layout=$repo/target/kiln-test-cache/debian-oci
if [ ! -f "$layout/index.json" ]; then
    bash "$repo/tests/fixtures/make-debian-oci.sh" "$layout" "$repo/target/kiln-test-cache/debian-oci-work"
fi
layer=$(python3 -c 'import json,sys; d=sys.argv[1]; i=json.load(open(d+"/index.json")); m=json.load(open(d+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(d+"/blobs/sha256/"+m["layers"][0]["digest"][7:])' "$layout")
printf '[cluster]\nname = "b"\nseed = "b"\n[defaults]\nimage = "bootc-uefi-x86"\nbmc = { address = "redfish+http://127.0.0.1:1/redfish/v1/Systems/{name}", username = "u", password = { file = "pw" } }\n[[node]]\nname = "edge-1"\nboot_mac = "52:54:00:00:00:01"\n' > "$work/cluster.toml"
echo pw > "$work/pw"

# kiln reports its stages when it assembles a disk from an image ("unpack X s, root ext4 N MiB
# Y s"); each run starts from an empty cache. The reference gets the same tree (`tar -xzf` of the
# same layer, as root so owners are kept) and a partition of the same size, with the page cache
# flushed before each step.
runs=3
: > "$work/stages.txt"
for i in $(seq $runs); do
    rm -rf "$work/kc" "$work/kout"; sync
    KILN_CACHE_DIR="$work/kc" "$kiln" build -c "$work/cluster.toml" --node edge-1 \
        --base "oci:$layout:base" -o "$work/kout" 2>&1 >/dev/null | grep '^assembled' >> "$work/stages.txt"
done
root_mib=$(sed -n 's/.*root ext4 \([0-9]*\) MiB.*/\1/p' "$work/stages.txt" | head -1)
: > "$work/ref.txt"
for i in $(seq $runs); do
    rm -rf "$work/tree" "$work/mke2fs.img"; mkdir "$work/tree"; truncate -s "${root_mib}M" "$work/mke2fs.img"; sync
    t0=$(date +%s.%N); tar -xzf "$layer" -C "$work/tree"; t1=$(date +%s.%N)
    sync
    t2=$(date +%s.%N); mke2fs -q -F -t ext4 -d "$work/tree" "$work/mke2fs.img" "${root_mib}M"; t3=$(date +%s.%N)
    echo "$t0 $t1 $t2 $t3" >> "$work/ref.txt"
done
e2fsck -fn "$work/mke2fs.img" >/dev/null 2>&1
rm -rf "$work/tree"
python3 - "$work/stages.txt" "$work/ref.txt" "$root_mib" <<'PY'
import re, statistics, sys
k = [tuple(float(x) for x in re.search(r"unpack ([0-9.]+) s, root ext4 \d+ MiB ([0-9.]+) s, total ([0-9.]+) s", l).groups())
     for l in open(sys.argv[1])]
r = [[float(x) for x in l.split()] for l in open(sys.argv[2])]
ku, ke, kt = (statistics.mean(c) for c in zip(*k))
ru = statistics.mean(t1 - t0 for t0, t1, _, _ in r)
re_ = statistics.mean(t3 - t2 for _, _, t2, t3 in r)
print(f"root partition {sys.argv[3]} MiB, {len(k)} runs each (means)")
print(f"tree -> ext4:  kiln (mke2fs -d + owner/mode/time/xattr fixups) {ke:5.2f} s   bare mke2fs -d {re_:5.2f} s")
print(f"layer -> tree: kiln unpack (verified, unprivileged)            {ku:5.2f} s   tar -xzf        {ru:5.2f} s")
print(f"kiln: whole base disk (unpack, ESP, ext4, GPT) {kt:.2f} s")
print(f"ext4 step kiln/mke2fs = {ke / re_:.2f} (goal <= 1.2); unpack kiln/tar = {ku / ru:.2f}")
PY
