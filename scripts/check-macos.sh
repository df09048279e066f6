#!/usr/bin/env bash
# Type-checks kiln for macOS, Intel (x86_64-apple-darwin) and Apple silicon (aarch64-apple-darwin),
# with clippy, without a Mac: the macOS-only code (diskutil, /dev/rdiskN and its ioctls, unmount
# and eject) must at least compile and pass the lints on both. Nothing is linked or run. The C of
# kiln's dependencies (xz, zstd, ring, aws-lc) is compiled by zig's C compiler, which has macOS's
# libc headers; scripts/setup.sh installs zig and both Rust targets.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KILN_PY_VENV:-/opt/kiln-test-venv}
zig=$("$venv/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))' 2>/dev/null || true)
installed=$(rustup target list --installed 2>/dev/null || true)
for target in x86_64-apple-darwin aarch64-apple-darwin; do
    if [ -z "$zig" ] || ! grep -qx "$target" <<<"$installed"; then
        [ "${KILN_REQUIRE_TOOLS:-}" = 1 ] && { echo "macOS type-check: zig or the Rust target $target is missing" >&2; exit 1; }
        echo "SKIPPED: macOS type-check for $target (run scripts/setup.sh)"
        continue
    fi
    arch=${target%%-*}
    tools=target/macos-tools/$arch
    mkdir -p "$tools"
    # cc passes clang-style target flags zig spells differently; zig's own -target says it all.
    cat > "$tools/cc" <<WRAP
#!/bin/sh
set -- \$(for a in "\$@"; do case "\$a" in --target=*|-arch|x86_64|arm64|aarch64) ;; *) printf '%s\n' "\$a";; esac; done)
exec "$zig" cc -target $arch-macos "\$@"
WRAP
    printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$zig" > "$tools/ar"
    chmod +x "$tools/cc" "$tools/ar"
    env_target=${target//-/_}
    env "CC_$env_target=$PWD/$tools/cc" "AR_$env_target=$PWD/$tools/ar" \
        cargo clippy --quiet --target "$target" --all-targets --target-dir target/macos -- -D warnings
    echo "macOS type-check ($target): clean"
done
