#!/usr/bin/env bash
# Inflate: the HypriotOS release is a zip (deflate) and OCI layers are gzip. `kiln flash` of a
# .zip and of a .gz into a file (kiln inflates with flate2's zlib-rs backend; --no-verify, so
# only inflate + write are timed) beside `unzip -p` and `gzip -dc` writing the same file. The
# input is 384 MiB of this machine's /usr (OS files, as in an image), deflated at level 6 by
# `zip` and `gzip`. Every output is compared with the input. Prints mean times and the ratios.
# Goal: kiln <= 1.0x unzip and gzip.
#
# Usage: bench/inflate.sh [WORKDIR]   needs hyperfine, zip, unzip, gzip
set -euo pipefail
source "$(dirname "$0")/common.sh"

raw=$work/usr-384M.img
if [ ! -f "$raw.zip" ] || [ ! -f "$raw.gz" ]; then
    # tar exits non-zero when head closes the pipe: only the first 384 MiB are wanted.
    (tar -cf - /usr/lib /usr/share 2>/dev/null || true) | head -c 384M > "$raw"
    rm -f "$raw.zip" "$raw.gz"
    (cd "$work" && zip -q -6 "$raw.zip" "$(basename "$raw")")
    gzip -6 -k -c "$raw" > "$raw.gz"
fi
echo "input: $(($(stat -c %s "$raw") >> 20)) MiB; zip $(($(stat -c %s "$raw.zip") >> 20)) MiB, gz $(($(stat -c %s "$raw.gz") >> 20)) MiB (level 6)"

out=$work/inflate-out.img
flash="'$kiln' flash --yes --no-verify --progress none"
hyperfine --runs 5 --warmup 1 --export-json "$work/inflate.json" --prepare "rm -f '$out'" \
    -n kiln-zip "$flash '$raw.zip' '$out'" \
    -n unzip "unzip -p '$raw.zip' > '$out'" \
    -n kiln-gz "$flash '$raw.gz' '$out'" \
    -n gzip "gzip -dc '$raw.gz' > '$out'"

for c in "$flash '$raw.zip' '$out'" "unzip -p '$raw.zip' > '$out'" \
    "$flash '$raw.gz' '$out'" "gzip -dc '$raw.gz' > '$out'"; do
    rm -f "$out"
    eval "$c"
    cmp "$out" "$raw" || { echo "not the input: $c" >&2; exit 1; }
done
rm -f "$out"

python3 - "$work/inflate.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
for n in ("kiln-zip", "unzip", "kiln-gz", "gzip"):
    print(f"{n:10} {r[n]:6.2f} s")
print(f"kiln/unzip = {r['kiln-zip'] / r['unzip']:.2f}, kiln/gzip = {r['kiln-gz'] / r['gzip']:.2f}"
      " (goal <= 1.0); every output equals the input (cmp)")
PY
