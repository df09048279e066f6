#!/usr/bin/env bash
# Type-checks kiln for macOS (x86_64-apple-darwin) with clippy, without a Mac: the macOS-only code
# (diskutil, /dev/rdiskN, diskutil eject) must at least compile and pass the lints. Nothing is
# linked or run. The C of kiln's dependencies (xz, zstd, ring, aws-lc) is compiled by zig's C
# compiler, which has macOS's libc headers; scripts/setup.sh installs zig and the Rust target.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KILN_PY_VENV:-/opt/kiln-test-venv}
zig=$("$venv/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))' 2>/dev/null || true)
if [ -z "$zig" ] || ! rustup target list --installed 2>/dev/null | grep -qx x86_64-apple-darwin; then
    [ "${KILN_REQUIRE_TOOLS:-}" = 1 ] && { echo "macOS type-check: zig or the Rust target is missing" >&2; exit 1; }
    echo "SKIPPED: macOS type-check (run scripts/setup.sh)"
    exit 0
fi
tools=target/macos-tools
mkdir -p "$tools"
# cc passes clang-style target flags zig spells differently; zig's own -target says it all.
cat > "$tools/cc" <<WRAP
#!/bin/sh
set -- \$(for a in "\$@"; do case "\$a" in --target=*|-arch|x86_64) ;; *) printf '%s\n' "\$a";; esac; done)
exec "$zig" cc -target x86_64-macos "\$@"
WRAP
printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$zig" > "$tools/ar"
chmod +x "$tools/cc" "$tools/ar"
CC_x86_64_apple_darwin=$PWD/$tools/cc AR_x86_64_apple_darwin=$PWD/$tools/ar \
    cargo clippy --quiet --target x86_64-apple-darwin --all-targets --target-dir target/macos -- -D warnings
echo "macOS type-check: clean"
