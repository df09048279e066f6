#!/bin/sh
# Copies the CNI plugins this example's conf names (bridge, host-local, loopback) from Debian's
# containernetworking-plugins (/usr/lib/cni) into cni/bin, executable. Binaries are not kept in git.
#   apt-get install containernetworking-plugins && sh examples/cni-dev/fill-cni-bin.sh
set -eu
src=${CNI_PLUGINS_DIR:-/usr/lib/cni}
dest=$(dirname "$0")/cni/bin
for p in bridge host-local loopback; do
    if [ ! -x "$src/$p" ]; then
        echo "no $src/$p: apt-get install containernetworking-plugins (or set CNI_PLUGINS_DIR)" >&2
        exit 1
    fi
    install -m 0755 "$src/$p" "$dest/$p"
done
echo "cni/bin: $(ls "$dest" | tr '\n' ' ')"
