#!/usr/bin/env bash
# `kiln flash --node` streaming a node from its cached 1.3 GB HypriotOS-layout base (900 MB of
# data), beside `kiln flash` of the same node's image built beforehand with `kiln build` (the
# build is not timed), onto the same loop device. Both skip blocks by the same map and read back
# what they wrote. Prints the mean times (hyperfine), the ratio, and whether the streamed flash
# left an image file anywhere. Goal: streamed / pre-built <= 1.05, no image file written.
#
# Usage (root): bench/flash-node.sh [WORKDIR]   needs hyperfine, mtools, sfdisk, mkfs.vfat, mkfs.ext4
set -euo pipefail
source "$(dirname "$0")/common.sh"

base=$work/hypriot-1.3G.img
[ -f "$base" ] || bash "$repo/bench/make-hypriot-base.sh" "$base"
export KILN_CACHE_DIR=$work/cache
cluster=$repo/examples/ceil/cluster.toml
node=ceil-one

# The node's image as `kiln build` makes it: what "flash the pre-built image" writes.
rm -rf "$work/prebuilt"
"$kiln" build --cluster "$cluster" --node $node --base "$base" --out "$work/prebuilt" >/dev/null
img=$work/prebuilt/$node.img

backing=$work/flash-node-target.img
truncate -s 1400M "$backing"
loop=$(losetup -f --show "$backing")
trap 'losetup -d "$loop"' EXIT

# The streamed flash runs in an empty directory: `out/` there would be an image file written.
cwd=$work/flash-node-cwd
rm -rf "$cwd"
mkdir -p "$cwd"
flags="--yes --allow-non-removable --progress none"
hyperfine --warmup 1 --runs 5 --export-json "$work/flash-node.json" \
    --prepare "sync; echo 1 > /proc/sys/vm/drop_caches" \
    -n streamed "cd '$cwd' && '$kiln' flash --cluster '$cluster' --node $node --base '$base' '$loop' $flags" \
    -n prebuilt "'$kiln' flash '$img' '$loop' $flags"

# The card the streamed flash leaves is the card the image makes, on every block the map names.
(cd "$cwd" && "$kiln" flash --cluster "$cluster" --node $node --base "$base" "$loop" $flags 2>/dev/null)
python3 - "$img" "$img.bmap" "$loop" <<'PY'
import re, sys
img, bmap, dev = sys.argv[1:]
text = open(bmap).read()
size = int(re.search(r"<ImageSize>\s*(\d+)", text).group(1))
with open(img, "rb") as a, open(dev, "rb") as b:
    for first, last in re.findall(r"<Range[^>]*>\s*(\d+)(?:-(\d+))?\s*<", text):
        lo, hi = int(first) * 4096, min((int(last or first) + 1) * 4096, size)
        a.seek(lo); b.seek(lo)
        if a.read(hi - lo) != b.read(hi - lo):
            sys.exit(f"streamed card differs from {img} in bytes {lo}..{hi}")
print("streamed card == pre-built image on every mapped block")
PY
written=$(find "$cwd" -type f | wc -l)

python3 - "$work/flash-node.json" "$written" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
s, p = r["streamed"], r["prebuilt"]
print(f"flash --node (streamed from the cached base)   {s:6.2f} s   files written: {sys.argv[2]}")
print(f"flash of the pre-built image                   {p:6.2f} s")
print(f"streamed / pre-built = {s / p:.2f} (goal <= 1.05)")
PY
