#!/usr/bin/env bash
# Stamping one node from a cached 1.3 GB HypriotOS-layout base: `kiln build` beside the shell way
# a user would otherwise take (`cp --sparse=always` of the base, then `mcopy` of the three seed
# files into the boot FAT). kiln also writes a bmap and a sha256 of the result; the shell way
# does not, so a third row adds `sha256sum` to it for an like-for-like comparison.
# Prints the mean times (hyperfine) and the ratios. Goal: kiln / (cp + mcopy) <= 1.0.
#
# Usage: bench/stamp.sh [WORKDIR]   (needs hyperfine, mtools, sfdisk, mkfs.vfat, mkfs.ext4)
set -euo pipefail
source "$(dirname "$0")/common.sh"

base=$work/hypriot-1.3G.img
[ -f "$base" ] || bash "$repo/bench/make-hypriot-base.sh" "$base"
export KILN_CACHE_DIR=$work/cache
cluster=$repo/examples/ceil/cluster.toml

# The seed files the shell way copies: exactly the ones kiln writes for the node.
"$kiln" build --cluster "$cluster" --node ceil-one --base "$base" --out "$work/seed" >/dev/null
seed=$work/seed-files
mkdir -p "$seed"
for f in user-data meta-data network-config; do
    MTOOLS_SKIP_CHECK=1 mtype -i "$work/seed/ceil-one.img@@1048576" "::$f" > "$seed/$f"
done

shell_way="cp --sparse=always '$base' '$work/shell.img' && MTOOLS_SKIP_CHECK=1 mcopy -o -i '$work/shell.img@@1048576' '$seed/user-data' '$seed/meta-data' '$seed/network-config' ::/"
hyperfine --warmup 1 --runs 5 --export-json "$work/stamp.json" \
    --prepare "rm -rf '$work/out' '$work/shell.img'; sync" \
    -n kiln "'$kiln' build --cluster '$cluster' --node ceil-one --base '$base' --out '$work/out'" \
    -n cp+mcopy "$shell_way" \
    -n cp+mcopy+sha256sum "$shell_way && sha256sum '$work/shell.img' >/dev/null"

python3 - "$work/stamp.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
k = r["kiln"]
print(f"kiln build:            {k:6.2f} s")
print(f"cp + mcopy:            {r['cp+mcopy']:6.2f} s   ratio kiln/shell = {k / r['cp+mcopy']:.2f} (goal <= 1.0)")
print(f"cp + mcopy + sha256sum:{r['cp+mcopy+sha256sum']:6.2f} s   ratio = {k / r['cp+mcopy+sha256sum']:.2f}")
PY
