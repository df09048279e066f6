#!/bin/sh
# kiln-swarm: bring this node into its Docker swarm, once, on first boot.
#
# Reads /etc/kiln/swarm.env (written by kiln):
#   ROLE=init|join          init: the first manager runs `docker swarm init`
#   ADVERTISE_ADDR=...      this node's address (or interface) for --advertise-addr
#   MANAGER_ADDR=...        join: the manager to join, port 2377
#   TOKEN_FILE=...          join: a root-only file holding the join token
#   MAX_ATTEMPTS=0          0 retries for ever (the default)
#
# Idempotent: a node already in a swarm exits 0 at once. The token file is deleted after a
# successful join. Waits for dockerd and a default route, and retries with exponential backoff
# (5 s doubling to 5 min), because the manager may boot after its workers.
set -u

ENV_FILE=${KILN_SWARM_ENV:-/etc/kiln/swarm.env}
[ -r "$ENV_FILE" ] || { echo "kiln-swarm: $ENV_FILE missing" >&2; exit 1; }
. "$ENV_FILE"
: "${ROLE:?ROLE not set in $ENV_FILE}" "${ADVERTISE_ADDR:?ADVERTISE_ADDR not set in $ENV_FILE}"
MAX_ATTEMPTS=${MAX_ATTEMPTS:-0}
DELAY=${INITIAL_DELAY:-5}
MAX_DELAY=${MAX_DELAY:-300}

log() { echo "kiln-swarm: $*"; }

swarm_state() { docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null; }

network_ready() {
    # No `ip` (busybox images without iproute2): do not block on what cannot be checked.
    command -v ip >/dev/null 2>&1 || return 0
    [ -n "$(ip route show default 2>/dev/null)" ]
}

attempt=0
while :; do
    state=$(swarm_state)
    case "$state" in
        active)
            log "already part of a swarm"
            [ "$ROLE" = join ] && rm -f "$TOKEN_FILE"
            exit 0 ;;
        "") log "waiting for dockerd" ;;
        *)
            if ! network_ready; then
                log "waiting for the network (no default route)"
            elif [ "$ROLE" = init ]; then
                if docker swarm init --advertise-addr "$ADVERTISE_ADDR"; then
                    log "initialised the swarm, advertising $ADVERTISE_ADDR"
                    exit 0
                fi
            elif [ "$ROLE" = join ]; then
                if [ ! -s "$TOKEN_FILE" ]; then
                    log "no join token at $TOKEN_FILE and not in a swarm; nothing to do" >&2
                    exit 1
                fi
                token=$(cat "$TOKEN_FILE")
                if docker swarm join --token "$token" --advertise-addr "$ADVERTISE_ADDR" "$MANAGER_ADDR:2377"; then
                    rm -f "$TOKEN_FILE"
                    log "joined the swarm at $MANAGER_ADDR"
                    exit 0
                fi
            else
                log "unknown ROLE=$ROLE" >&2
                exit 1
            fi ;;
    esac
    attempt=$((attempt + 1))
    if [ "$MAX_ATTEMPTS" -gt 0 ] && [ "$attempt" -ge "$MAX_ATTEMPTS" ]; then
        log "giving up after $attempt attempts" >&2
        exit 1
    fi
    log "retrying in ${DELAY}s (attempt $attempt)"
    sleep "$DELAY"
    DELAY=$((DELAY * 2))
    [ "$DELAY" -gt "$MAX_DELAY" ] && DELAY=$MAX_DELAY
done
