#!/usr/bin/env bash
# RAW -> Android sparse on the same 2 GiB image (about 25% data, ext4): `kiln convert --to
# android-sparse` beside `img2simg`. kiln reads only what the image's bmap maps (here made by
# `bmaptool create`, as kiln's own builds carry one); img2simg reads every block to find zeros.
# Both outputs are checked with simg2img against the image. Prints mean times and the ratio.
# Goal: kiln <= 1.0x img2simg.
#
# Usage: bench/sparse.sh [WORKDIR]   needs hyperfine, bmap-tools, android-sdk-libsparse-utils, e2fsprogs, fdisk
set -euo pipefail
source "$(dirname "$0")/common.sh"

img=$work/data-2G.img
bash "$repo/bench/make-data-image.sh" "$img"

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
