#!/usr/bin/env bash
# kiln on arm64 Linux (a Pi can run it: the ceil router): cross-builds kiln with Debian's aarch64
# toolchain, then runs the arm64 binary under qemu-user on kiln's main job — the sample node of
# the quick start — and compares its image digest with the one this machine's own build makes.
# Same inputs, same bytes, whichever architecture kiln itself runs on.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null ||
    ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    [ "${KILN_REQUIRE_TOOLS:-}" = 1 ] && { echo "aarch64 check: the cross toolchain, qemu-user or the Rust target is missing" >&2; exit 1; }
    echo "SKIPPED: aarch64 check (run scripts/setup.sh)"
    exit 0
fi
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    cargo build --quiet --locked --bin kiln --target "$target" --target-dir target/aarch64
arm=target/aarch64/$target/debug/kiln
file "$arm" | grep -q "ARM aarch64" || { echo "aarch64 check: $arm is not an arm64 binary" >&2; exit 1; }
cargo build --quiet --locked --bin kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SOURCE_DATE_EPOCH=1700000000 qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm" build \
    --cluster examples/ceil/cluster.toml --node ceil-one --base sample --out "$work/arm64" >/dev/null
SOURCE_DATE_EPOCH=1700000000 target/debug/kiln build \
    --cluster examples/ceil/cluster.toml --node ceil-one --base sample --out "$work/host" >/dev/null
arm_sum=$(cut -d' ' -f1 "$work/arm64/ceil-one.img.sha256sum")
host_sum=$(cut -d' ' -f1 "$work/host/ceil-one.img.sha256sum")
# The image itself is hashed again here, not only read from kiln's own checksum files.
[ "$(sha256sum < "$work/arm64/ceil-one.img" | cut -d' ' -f1)" = "$arm_sum" ] || { echo "aarch64 check: the arm64 build's checksum file does not match its image" >&2; exit 1; }
if [ "$arm_sum" != "$host_sum" ]; then
    echo "aarch64 check: arm64 kiln made $arm_sum, $(uname -m) kiln made $host_sum" >&2
    exit 1
fi
echo "aarch64 check: $(file -b "$arm" | cut -d, -f1-2) built; under qemu-aarch64 it made ceil-one.img sha256 $arm_sum, the same as $(uname -m)"
