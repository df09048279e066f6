#!/usr/bin/env bash
# Writing a 2 GiB image with about 25% data, xz-compressed, to a loop device: kiln flash beside
# `xzcat | dd bs=4M oflag=direct conv=fsync` and `bmaptool copy` (both kiln and bmaptool get the
# same bmap, made by `bmaptool create`). Prints mean times (hyperfine) and the ratios.
# Goals: kiln <= 1.0x bmaptool, <= 0.5x dd; kiln with verify <= 1.4x kiln without.
#
# Usage (root): bench/flash.sh [WORKDIR]   needs hyperfine, bmap-tools, xz-utils, e2fsprogs, fdisk
set -euo pipefail
source "$(dirname "$0")/common.sh"

img=$work/data-2G.img
bash "$repo/bench/make-data-image.sh" "$img" >/dev/null
[ -f "$img.xz" ] || xz -T0 -1 -k -f "$img"
echo "image: $(du -h --apparent-size "$img" | cut -f1) raw, $(grep -o '<MappedBlocksCount> [0-9][0-9]*' "$img.bmap" | awk '{printf "%d MiB", $2*4/1024}') mapped, $(du -h "$img.xz" | cut -f1) as xz"

backing=$work/flash-target.img
truncate -s 2200M "$backing"
loop=$(losetup -f --show "$backing")
trap 'losetup -d "$loop"' EXIT

hyperfine --runs 3 --export-json "$work/flash.json" --prepare "sync; echo 1 > /proc/sys/vm/drop_caches" \
    -n kiln "'$kiln' flash '$img.xz' '$loop' --bmap '$img.bmap' --yes --allow-non-removable --progress none" \
    -n kiln-no-verify "'$kiln' flash '$img.xz' '$loop' --bmap '$img.bmap' --yes --allow-non-removable --progress none --no-verify" \
    -n bmaptool "bmaptool -q copy --bmap '$img.bmap' '$img.xz' '$loop'" \
    -n dd "xzcat '$img.xz' | dd of='$loop' bs=4M oflag=direct conv=fsync status=none"

python3 - "$work/flash.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
k, kn = r["kiln"], r["kiln-no-verify"]
print(f"kiln (verify)      {k:6.2f} s")
print(f"kiln --no-verify   {kn:6.2f} s   verify/no-verify = {k / kn:.2f} (goal <= 1.4)")
print(f"bmaptool copy      {r['bmaptool']:6.2f} s   kiln/bmaptool = {kn / r['bmaptool']:.2f} (goal <= 1.0, without verify: bmaptool does not read back)")
print(f"xzcat | dd         {r['dd']:6.2f} s   kiln/dd = {kn / r['dd']:.2f} (goal <= 0.5)")
PY
