#!/usr/bin/env bash
# Pushing a 2 GiB disk image to a registry: `kiln publish --to oci://…` (an Ironic disk-image
# artifact) beside `skopeo copy` of an OCI layout holding the same bytes as its one layer, both to
# Debian's docker-registry on loopback. Prints wall time and peak RSS (GNU time's %M) of each:
# the goal is that kiln streams the image (peak RSS far below the image's size), and that its
# time is in line with skopeo's.
# Usage: bench/oci-push.sh [WORKDIR]   needs docker-registry, skopeo, GNU time, bmap-tools, e2fsprogs
set -euo pipefail
source "$(dirname "$0")/common.sh"

img=$work/data-2G.img
bash "$repo/bench/make-data-image.sh" "$img"
size=$(stat -c %s "$img")
sha=$(sha256sum "$img" | cut -c1-64)

# A build directory as `kiln build` leaves it, for the image above.
out=$work/push-out
rm -rf "$out" && mkdir -p "$out"
ln -f "$img" "$out/bench.img" 2>/dev/null || cp --sparse=always "$img" "$out/bench.img"
cat > "$out/bench.manifest.json" <<JSON
{"kiln_version":"bench","node":"bench","profile":"metal3-uefi-x86","source_date_epoch":null,
 "fat_timestamp":"","disk_signature":null,"instance_id":"bench","inputs":[],
 "outputs":[{"role":"image","path":"bench.img","sha256":"$sha","size":$size}]}
JSON

# The same bytes as an OCI layout (one layer, the image as it is) for skopeo.
layout=$work/push-layout
rm -rf "$layout" && mkdir -p "$layout/blobs/sha256"
ln -f "$img" "$layout/blobs/sha256/$sha" 2>/dev/null || cp --sparse=always "$img" "$layout/blobs/sha256/$sha"
python3 - "$layout" "$sha" "$size" <<'PY'
import hashlib, json, os, sys
d, sha, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
def put(b):
    h = hashlib.sha256(b).hexdigest()
    open(os.path.join(d, "blobs/sha256", h), "wb").write(b)
    return "sha256:" + h, len(b)
cfg = put(b"{}")
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg[0], "size": cfg[1]},
    "layers": [{"mediaType": "application/octet-stream", "digest": "sha256:" + sha, "size": size}]}).encode()
md = put(m)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md[0], "size": md[1], "annotations": {"org.opencontainers.image.ref.name": "bench"}}]},
    open(os.path.join(d, "index.json"), "w"))
open(os.path.join(d, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
PY

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
registry() {
    rm -rf "$work/registry" && mkdir -p "$work/registry"
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
        "$work/registry" "$port" > "$work/registry.yml"
    docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
    reg=$!
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.1; done
    echo "docker-registry did not start" >&2; exit 1
}
trap 'kill $reg 2>/dev/null || true' EXIT

# Each tool pushes into an empty registry, with the page cache dropped of dirty pages first.
registry; sync
/usr/bin/time -f '%e %M' -o "$work/kiln.time" \
    "$kiln" publish --node bench --out "$out" --to "oci://127.0.0.1:$port/bench/images" --insecure >/dev/null
kill $reg; wait $reg 2>/dev/null || true
registry; sync
/usr/bin/time -f '%e %M' -o "$work/skopeo.time" \
    skopeo copy --quiet --dest-tls-verify=false "oci:$layout:bench" "docker://127.0.0.1:$port/bench/images:skopeo"
read -r kt km < "$work/kiln.time"
read -r st sm < "$work/skopeo.time"
echo "image: $((size >> 20)) MiB pushed as one layer"
printf 'kiln publish --to oci://   %6.2f s   peak RSS %4d MiB\n' "$kt" $((km / 1024))
printf 'skopeo copy (OCI layout)   %6.2f s   peak RSS %4d MiB\n' "$st" $((sm / 1024))
python3 -c "import sys; print(f'kiln/skopeo time = {float(sys.argv[1])/float(sys.argv[2]):.2f}; kiln peak RSS = {int(sys.argv[3])/1024/int(sys.argv[4])*100:.1f} % of the image')" "$kt" "$st" "$km" $((size >> 20))
