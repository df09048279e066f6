#!/usr/bin/env bash
# The Debian package, made and judged the way Debian judges one: `cargo deb` builds it (binary,
# man page, completions, profiles, overlays and examples in their Debian places), lintian must
# report no error, and it is installed with apt into a clean debootstrap chroot (minbase
# bookworm) where `kiln --version` and `kiln check` on an installed example must work.
# Needs root (chroot), cargo-deb, lintian and debootstrap (scripts/setup.sh installs them).
#
# `--test-build` (scripts/test.sh) packages the dev binary the tests have just built instead of a
# release build: what the package is judged on here (its layout, lintian, apt's dependency
# resolution, the binary running in a clean system) does not depend on the optimisation level, and
# a release build would add most of ten minutes to CI. cargo-deb refuses `target/debug` as an
# asset on purpose (it makes releases; `--profile dev` is deprecated there), so the binary is
# copied to the directory of a `deb-test` profile (named only here, never built) and packaged
# from there with `--no-build`, stripped as a release one is.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --test-build ]; then
    profile=deb-test
elif [ $# -gt 0 ]; then
    echo "usage: scripts/package-deb.sh [--test-build]" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    [ "${KILN_REQUIRE_TOOLS:-}" = 1 ] && { echo "deb package: the install check needs root (chroot)" >&2; exit 1; }
    echo "SKIPPED: Debian package (its install check chroots: run as root)"
    exit 0
fi
if ! cargo deb --version >/dev/null 2>&1 || ! command -v lintian >/dev/null || ! command -v debootstrap >/dev/null; then
    [ "${KILN_REQUIRE_TOOLS:-}" = 1 ] && { echo "deb package: cargo-deb, lintian or debootstrap is missing" >&2; exit 1; }
    echo "SKIPPED: Debian package (run scripts/setup.sh)"
    exit 0
fi
if [ "$profile" = release ]; then
    cargo build --quiet --release --locked
    bin=target/release/kiln
    deb_flags=()
else
    # Up to date after the tests, so this only checks; it builds when run on its own.
    cargo build --quiet --locked --bin kiln
    mkdir -p target/deb-test
    cp target/debug/kiln target/deb-test/kiln
    bin=target/deb-test/kiln
    # Stripped (24 MB of its 50) and compressed fast: the package is installed once and
    # thrown away.
    deb_flags=(--profile deb-test --strip --fast)
fi
assets=target/deb-assets
mkdir -p "$assets"
"$bin" manpage | gzip -9n > "$assets/kiln.1.gz"
"$bin" completions bash > "$assets/kiln.bash"
"$bin" completions zsh > "$assets/_kiln"
"$bin" completions fish > "$assets/kiln.fish"
deb=$(cargo deb --no-build --quiet "${deb_flags[@]}" | tail -1)
[ -f "$deb" ] || deb=$(ls -t target/debian/kiln_*.deb | head -1)
echo "deb package: $deb ($(stat -c %s "$deb") bytes)"
lintian --fail-on error --tag-display-limit 0 "$deb"

# A clean minbase bookworm, debootstrapped once and kept as a tarball; each run unpacks a copy.
cache=target/kiln-test-cache
mkdir -p "$cache"
if [ ! -f "$cache/minbase-bookworm.tar" ]; then
    tmp=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$tmp" "$(bash tests/fixtures/debian-mirror.sh)" >/dev/null
    tar -C "$tmp" -cf "$cache/minbase-bookworm.tar.part" .
    mv "$cache/minbase-bookworm.tar.part" "$cache/minbase-bookworm.tar"
    rm -rf "$tmp"
fi
root=$(mktemp -d)
trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT
tar -C "$root" -xf "$cache/minbase-bookworm.tar"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/kiln.deb"
mount --bind /proc "$root/proc"
# apt resolves the package's dependencies (e2fsprogs, libc) from the mirror, as a user's would.
DEBIAN_FRONTEND=noninteractive chroot "$root" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends /tmp/kiln.deb' >/dev/null
chroot "$root" kiln --version
chroot "$root" kiln check --cluster /usr/share/doc/kiln/examples/ceil/cluster.toml > "$root/tmp/check.out"
head -1 "$root/tmp/check.out"
chroot "$root" sh -c 'test -f /usr/share/man/man1/kiln.1.gz && test -f /usr/share/bash-completion/completions/kiln && test -f /usr/share/kiln/images/hypriot-rpi.toml'
echo "deb package: lintian clean of errors; installed into a clean bookworm chroot, kiln --version and kiln check ran there"
