#!/usr/bin/env bash
# Runs every fuzz target in tests/fuzz for a bounded time and fails on any crash, hang or leak
# libFuzzer reports. Usage: scripts/fuzz.sh [--smoke] [SECONDS_PER_TARGET] [TARGET…]
# Longer runs, e.g. 600 s each, find more: bash scripts/fuzz.sh 600 (a random seed each time, the
# corpus kept in tests/fuzz/corpus). The test command runs `--smoke 20`: libFuzzer seed 1 from an
# empty corpus and the same seed files every time, so that CI replays one sequence of inputs
# instead of drawing a new one per run (a CI gate that fails by chance helps no one); new
# crashes are found by the long runs.
# A crash leaves its input in tests/fuzz/artifacts/TARGET/; replay it with
#   cargo +nightly fuzz run --fuzz-dir tests/fuzz TARGET tests/fuzz/artifacts/TARGET/crash-…
# copy it to tests/fuzz/regressions/TARGET/ (every run replays those) and turn it into a unit
# test beside the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
if [ "${1:-}" = --smoke ]; then smoke=true; shift; fi
seconds=${1:-30}
shift || true
fuzz=(cargo +nightly fuzz)
# Overflow checks and debug assertions on, as libFuzzer's own Rust builds have them; no
# sanitizer: kiln's parsers are safe Rust, so panics and overflow checks are what find bugs, and
# an uninstrumented build is much quicker to make on a 2-core machine.
opts=(--fuzz-dir tests/fuzz --sanitizer none --debug-assertions)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir tests/fuzz)
fi
"${fuzz[@]}" build "${opts[@]}"

# Seeds made by independent tools, so that the first seconds already explore real formats
# (a fuzzer rarely guesses a valid FAT boot sector or GPT CRC by itself).
seeds=tests/fuzz/seeds
rm -rf "$seeds"
mkdir -p "$seeds"/{partition_table,fat,bmap,layer,oci_document,cluster_file,image_writers,http_range}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Every id and time in the seeds is fixed, so the seeds are the same bytes on every machine.
truncate -s 1M "$seeds/partition_table/mbr"
printf 'label: dos\nlabel-id: 0x6b696c6e\nstart=64, size=512, type=c\nstart=576, type=83\n' | sfdisk -q "$seeds/partition_table/mbr"
truncate -s 1M "$seeds/partition_table/gpt"
sgdisk -q -U 6b696c6e-0000-4000-8000-000000000000 -n 1:34:+256K -t 1:ef00 -u 1:6b696c6e-0000-4000-8000-000000000001 \
    -n 2:0:0 -u 2:6b696c6e-0000-4000-8000-000000000002 "$seeds/partition_table/gpt" >/dev/null
# FAT12 (what fits the 1 MiB inputs); FAT16/32 share the code paths past the BPB.
for spc in 1 4; do
    mkfs.vfat --invariant -i 6b696c6e -F 12 -s "$spc" -n SEED -C "$work/fat$spc" 1024 >/dev/null
    printf '#cloud-config\nhostname: seed\n' > "$work/user-data"
    touch -d 2020-01-01T00:00:00Z "$work/user-data"
    MTOOLS_SKIP_CHECK=1 mcopy -i "$work/fat$spc" "$work/user-data" ::/
    cp "$work/fat$spc" "$seeds/fat/fat12-spc$spc"
done
python3 - "$seeds" <<'PY'
import hashlib, io, json, sys, tarfile
seeds = sys.argv[1]
xml = """<?xml version="1.0" ?>
<bmap version="2.0">
    <ImageSize> 40960 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 10 </BlocksCount>
    <MappedBlocksCount> 3 </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> %s </BmapFileChecksum>
    <BlockMap>
        <Range chksum="%s"> 0-1 </Range>
        <Range> 7 </Range>
    </BlockMap>
</bmap>
"""
body = xml % ("0" * 64, "ab" * 32)
open(seeds + "/bmap/seed.bmap", "w").write(body.replace("0" * 64, hashlib.sha256(body.encode()).hexdigest(), 1))
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo("etc"); d.type = tarfile.DIRTYPE; t.addfile(d)
    f = tarfile.TarInfo("etc/hostname"); f.size = 5; t.addfile(f, io.BytesIO(b"seed\n"))
    l = tarfile.TarInfo("etc/link"); l.type = tarfile.SYMTYPE; l.linkname = "hostname"; t.addfile(l)
    w = tarfile.TarInfo("etc/.wh.old"); t.addfile(w)
open(seeds + "/layer/seed.tar", "wb").write(raw.getvalue())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "1" * 64, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "2" * 64, "size": 3}]}
json.dump(manifest, open(seeds + "/oci_document/manifest.json", "w"))
index = {"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "3" * 64, "platform": {"architecture": "amd64", "os": "linux"}}]}
json.dump(index, open(seeds + "/oci_document/index.json", "w"))
open(seeds + "/oci_document/ref", "w").write("docker://registry.example:5000/edge/node:1.0")
open(seeds + "/image_writers/seed", "wb").write(bytes([0x83, 7, 40, 200]) + b"kiln" * 1024)
for i, r in enumerate(["bytes=0-1023", "bytes=-512", "bytes=100-", "bytes=5-2", "bytes=0-1,4-5"]):
    open(seeds + "/http_range/r%d" % i, "wb").write((1 << 20).to_bytes(8, "little") + r.encode())
PY
for c in examples/*/cluster.toml; do
    cp "$c" "$seeds/cluster_file/$(basename "$(dirname "$c")").toml"
done

status=0
for t in "${targets[@]}"; do
    corpus=tests/fuzz/corpus/$t
    seed=()
    if $smoke; then
        corpus=$work/corpus-$t
        seed=(-seed=1)
    fi
    mkdir -p "$corpus"
    # Inputs that once crashed a target stay in tests/fuzz/regressions/TARGET and run every time.
    extra=("$seeds/$t")
    [ -d "tests/fuzz/regressions/$t" ] && extra+=("tests/fuzz/regressions/$t")
    if "${fuzz[@]}" run "${opts[@]}" "$t" "$corpus" "${extra[@]}" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -max_len=1048576 "${seed[@]}" \
        >"tests/fuzz/$t.log" 2>&1; then
        echo "fuzz: $t: $(grep -Eo 'Done [0-9]+ runs' "tests/fuzz/$t.log" | tail -1) in ${seconds} s, no crash"
    else
        echo "fuzz: $t: FAILED (see tests/fuzz/$t.log):"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "tests/fuzz/$t.log" | head -8
        status=1
    fi
done
exit $status
