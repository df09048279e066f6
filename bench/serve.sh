#!/usr/bin/env bash
# A 2 GiB image fetched by 1 and by 8 concurrent curl clients from kiln serve and from nginx
# (Debian, sendfile on) on loopback: aggregate throughput side by side, and kiln's peak resident
# memory. Goals: kiln >= 1.0x nginx at 8 clients; kiln under 64 MiB resident.
#
# Usage (root, for nginx's user directive): bench/serve.sh [WORKDIR]   needs curl, nginx
set -euo pipefail
source "$(dirname "$0")/common.sh"
mkdir -p "$work/srv"
img=$work/srv/bench-2G.raw
[ -f "$img" ] || head -c 2G /dev/urandom > "$img"
size=$(stat -c %s "$img")

kport=18181; nport=18182
"$kiln" serve "$work/srv" --listen 127.0.0.1:$kport 2>/dev/null &
kpid=$!
cat > "$work/nginx.conf" <<CONF
daemon off; user root; worker_processes auto; pid $work/nginx.pid; error_log stderr;
events { worker_connections 256; }
http { access_log off; sendfile on; tcp_nopush on; client_body_temp_path $work; proxy_temp_path $work;
       fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
       server { listen 127.0.0.1:$nport; root $work/srv; } }
CONF
nginx -c "$work/nginx.conf" 2>/dev/null &
npid=$!
trap 'kill $kpid; kill -TERM $npid; wait 2>/dev/null' EXIT
sleep 1

# Aggregate MiB/s of N parallel full downloads.
fetch() {
    local port=$1 n=$2 start end
    start=$(date +%s.%N)
    for i in $(seq 1 "$n"); do curl -s -o /dev/null "http://127.0.0.1:$port/bench-2G.raw" & done
    wait $(jobs -p | grep -v -e "^$kpid\$" -e "^$npid\$") 2>/dev/null || true
    end=$(date +%s.%N)
    python3 -c "print(f'{$n * $size / ($end - $start) / 2**20:.0f}')"
}
for n in 1 8; do
    curl -s -o /dev/null "http://127.0.0.1:$kport/bench-2G.raw"   # warm the page cache
    k=$(fetch $kport $n); x=$(fetch $nport $n)
    python3 -c "print(f'{$n} client(s): kiln {$k} MiB/s, nginx {$x} MiB/s, kiln/nginx = {$k/$x:.2f}')"
done
echo "kiln peak resident memory: $(awk '/VmHWM/ {print $2, $3}' /proc/$kpid/status) (goal < 64 MiB)"
