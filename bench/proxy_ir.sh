#!/usr/bin/env bash
# bench/proxy_ir.sh - instructions per request of each sidecar, counted by callgrind.
#
# Wall-clock figures on a shared 2-core machine swing by 2x from run to run; instruction counts
# do not (the same code gives the same count within ~0.1%). This runs the bench chain
#   client -> outbound `meshid proxy run` -> mTLS -> inbound `meshid proxy run` -> nginx ("ok")
# (access log off, as in bench/proxy.sh) with both proxies under `valgrind --tool=callgrind`, sends REQUESTS+200 and then 200 requests
# (8 keep-alive connections, one request at a time each) in two runs, and prints the difference
# per request for each proxy: startup and handshakes cancel out.
#
# USAGE  bench/proxy_ir.sh [--protocol http|tcp] [--requests N]     (default http, 2000)
# Needs valgrind, nginx and peers.sh's certificates (`bash ../shared/bench/peers.sh --setup`
# makes them); ~1 minute. Ports: app 28080, outbound 28001, inbound 28443, admin 25101/25102.
set -euo pipefail
PROTO=http N=2000
while (($#)); do
  case $1 in
    --protocol) PROTO=$2; shift 2 ;;
    --requests) N=$2; shift 2 ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CERTS=${CERTS:-${TMPDIR:-/tmp}/peerbench/run/certs}
[[ -f $CERTS/ca.pem ]] || { echo "no certificates in $CERTS: run ../shared/bench/peers.sh --setup" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'nginx -c "$WORK/nginx.conf" -s stop 2>/dev/null; rm -rf "$WORK"' EXIT
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:28080; keepalive_requests 1000000;
  location / { return 200 "ok"; } } }
EOF
cat > "$WORK/in.yaml" <<EOF
trust_domain: example.org
identity: {cert: "$CERTS/server.crt", key: "$CERTS/server.key", bundle: "$CERTS/ca.pem"}
admin: {listen: "127.0.0.1:25101"}
access_log: {path: null}  # off, as in bench/proxy.sh
inbound: [{name: in, listen: "127.0.0.1:28443", forward: "127.0.0.1:28080", protocol: $PROTO}]
EOF
cat > "$WORK/out.yaml" <<EOF
trust_domain: example.org
identity: {cert: "$CERTS/client.crt", key: "$CERTS/client.key", bundle: "$CERTS/ca.pem"}
admin: {listen: "127.0.0.1:25102"}
access_log: {path: null}
outbound: [{name: out, listen: "127.0.0.1:28001", upstream: ["127.0.0.1:28443"],
            expect_ids: ["spiffe://example.org/ns/default/sa/backend"], protocol: $PROTO}]
EOF
cat > "$WORK/client.py" <<'EOF'
import socket, sys, threading
total, conns = int(sys.argv[1]), 8
def run(n: int) -> None:
    s = socket.create_connection(("127.0.0.1", 28001))
    for _ in range(n):
        s.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\nok"):
            chunk = s.recv(65536)
            assert chunk, "connection closed"
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
    s.close()
threads = [threading.Thread(target=run, args=(total // conns,)) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
EOF
nginx -c "$WORK/nginx.conf"
export PYTHONHASHSEED=0
count() {  # count REQUESTS -> "IN OUT" instructions of the whole proxy processes
  local role pids=()
  for role in in out; do
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$role" \
      "$ROOT/.venv/bin/meshid" proxy run --config "$WORK/$role.yaml" > "$WORK/$role.log" 2>&1 &
    pids+=($!)
  done
  "$ROOT/.venv/bin/meshid" proxy wait --admin 127.0.0.1:25101 --timeout 180 > /dev/null
  "$ROOT/.venv/bin/meshid" proxy wait --admin 127.0.0.1:25102 --timeout 180 > /dev/null
  "$ROOT/.venv/bin/python" "$WORK/client.py" "$1"
  kill -TERM "${pids[@]}"; wait "${pids[@]}" || true
  echo "$(awk '/^summary:/{print $2}' "$WORK/cg.in") $(awk '/^summary:/{print $2}' "$WORK/cg.out")"
}
read -r a_in a_out <<< "$(count 200)"
read -r b_in b_out <<< "$(count $((N + 200)))"
echo "meshid $PROTO, instructions per request: inbound $(((b_in - a_in) / N)), outbound $(((b_out - a_out) / N))"
