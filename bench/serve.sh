#!/usr/bin/env bash
# A 2 GiB image fetched by 1 and by 8 concurrent curl clients from kiln serve and from nginx
# (Debian, sendfile on) on loopback: aggregate throughput side by side, and kiln's peak resident
# memory. Goals: kiln >= 1.0x nginx at 1 and at 8 clients (medians); kiln under 64 MiB resident.
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
# Rounds alternate between the servers; the medians are compared, since one round on a shared VM
# can be off by half (a single 1-client round has shown 0.63 and 1.11 on the same build).
rounds=${KILN_BENCH_ROUNDS:-5}
curl -s -o /dev/null "http://127.0.0.1:$kport/bench-2G.raw"   # warm the page cache
for n in 1 8; do
    ks=(); xs=()
    for r in $(seq "$rounds"); do ks+=("$(fetch $kport $n)"); xs+=("$(fetch $nport $n)"); done
    python3 - "$n" "${ks[*]}" "${xs[*]}" <<'PY'
import statistics, sys
n, k, x = sys.argv[1], [float(v) for v in sys.argv[2].split()], [float(v) for v in sys.argv[3].split()]
mk, mx = statistics.median(k), statistics.median(x)
print(f"{n} client(s), median of {len(k)} rounds: kiln {mk:.0f} MiB/s, nginx {mx:.0f} MiB/s, kiln/nginx = {mk / mx:.2f}"
      f"  (kiln {min(k):.0f}-{max(k):.0f}, nginx {min(x):.0f}-{max(x):.0f})")
PY
done
echo "kiln peak resident memory: $(awk '/VmHWM/ {print $2, $3}' /proc/$kpid/status) (goal < 64 MiB)"
