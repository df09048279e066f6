#!/bin/sh
# kiln-seed-scrub: once cloud-init has consumed the NoCloud seed, leave no secret on the boot FAT.
#
# The seed's user-data carries the wifi PSK, a swarm join token and password hashes, and the boot
# partition is FAT: every local user can read it, for the life of the card. kiln puts the same
# document without those parts at /etc/kiln/seed/user-data (written by cloud-init, so it only
# exists after the first boot consumed the seed). This script, run after cloud-final:
#   1. overwrites the seed's user-data in place with zeros (same size, so the FAT keeps the same
#      clusters and the old bytes do not linger in free space), then writes the clean document;
#   2. replaces cloud-init's own cached copies (root-only 0600/0400, but they would outlive the
#      secrets' use): user-data.txt gets the clean document; user-data.txt.i, cloud-config.txt and
#      the pickled datasource obj.pkl go, and cloud-init rebuilds them from the clean seed.
# meta-data (the instance-id) is untouched, so cloud-init sees the same instance on the next boot
# and runs no per-instance module again. Idempotent: once clean, it changes nothing.
set -eu

CLEAN=${KILN_CLEAN_USER_DATA:-/etc/kiln/seed/user-data}
SEED=${KILN_SEED_USER_DATA:-/boot/user-data}
CACHE=${KILN_CLOUD_INSTANCE:-/var/lib/cloud/instance}

log() { echo "kiln-seed-scrub: $*"; }

[ -r "$CLEAN" ] || { log "no $CLEAN; nothing to do"; exit 0; }

if [ -f "$SEED" ] && ! cmp -s "$CLEAN" "$SEED"; then
    size=$(wc -c < "$SEED")
    head -c "$size" /dev/zero | dd of="$SEED" conv=notrunc,fsync status=none
    cat "$CLEAN" > "$SEED"
    sync
    log "removed the secrets from $SEED"
fi

if [ -d "$CACHE" ] && ! cmp -s "$CLEAN" "$CACHE/user-data.txt"; then
    install -m 0600 "$CLEAN" "$CACHE/user-data.txt"
    rm -f "$CACHE/user-data.txt.i" "$CACHE/cloud-config.txt" "$CACHE/obj.pkl"
    sync
    log "removed the secrets from cloud-init's copies in $CACHE"
fi
log "the seed holds no secrets"
