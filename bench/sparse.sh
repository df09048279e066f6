#!/usr/bin/env bash
# RAW -> Android sparse on the same 2 GiB image (about 25% data, ext4): `kiln convert --to
# android-sparse` beside `img2simg`. kiln reads only what the image's bmap maps (here made by
# `bmaptool create`, as kiln's own builds carry one); img2simg reads every block to find zeros.
# Both outputs are checked with simg2img against the image. Prints mean times and the ratio.
# Goal: kiln <= 1.0x img2simg.
#
# Usage: bench/sparse.sh [WORKDIR]   needs hyperfine, bmap-tools, android-sdk-libsparse-utils, e2fsprogs, fdisk
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$repo/target/bench}
mkdir -p "$work"
work=$(cd "$work" && pwd)
kiln=$repo/target/release/kiln
(cd "$repo" && cargo build --release --quiet)

img=$work/sparse-2G.img
if [ ! -f "$img.bmap" ]; then
    tree=$(mktemp -d "$work/.tree.XXXXXX")
    mkdir -p "$tree/data"
    for i in $(seq 1 5); do head -c 100M /dev/urandom > "$tree/data/blob$i"; done
    rm -f "$img"
    truncate -s 2G "$img"
    printf 'label: dos\nstart=2048, type=83\n' | sfdisk --quiet "$img"
    mkfs.ext4 -q -F -E offset=1048576 -d "$tree" "$img" $(( (2048 - 1) * 1024 ))k
    rm -rf "$tree"
    bmaptool create -o "$img.bmap" "$img"
fi
echo "image: $(du -h --apparent-size "$img" | cut -f1) raw, $(grep -o '<MappedBlocksCount> [0-9][0-9]*' "$img.bmap" | awk '{printf "%d MiB", $2*4/1024}') mapped"

hyperfine --runs 5 --warmup 1 --export-json "$work/sparse.json" \
    -n kiln "'$kiln' convert '$img' --to android-sparse '$work/kiln.simg'" \
    -n img2simg "img2simg '$img' '$work/img2simg.simg'"

for s in kiln img2simg; do
    simg2img "$work/$s.simg" "$work/$s.back"
    cmp "$work/$s.back" "$img" || { echo "$s output does not expand to the image" >&2; exit 1; }
    rm -f "$work/$s.back"
done
python3 - "$work/sparse.json" "$work/kiln.simg" "$work/img2simg.simg" <<'PY'
import json, os, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"kiln convert   {r['kiln']:6.2f} s   {os.path.getsize(sys.argv[2]) >> 20} MiB")
print(f"img2simg       {r['img2simg']:6.2f} s   {os.path.getsize(sys.argv[3]) >> 20} MiB")
print(f"kiln/img2simg = {r['kiln'] / r['img2simg']:.2f} (goal <= 1.0); both expand to the image (simg2img + cmp)")
PY
