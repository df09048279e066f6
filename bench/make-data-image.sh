#!/usr/bin/env bash
# The 2 GiB test image the flash, sparse and disk benchmarks share: an MBR with one ext4
# partition holding 500 MiB of random data (about 25 % of the image), and its bmap made by
# `bmaptool create`. Made once; later calls only print what it is.
# Usage: bench/make-data-image.sh IMG
set -euo pipefail
img=$1
work=$(dirname "$img")
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
