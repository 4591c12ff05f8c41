#!/usr/bin/env bash
# bench/proxy.sh - measure meshid's sidecar chain beside HAProxy, nginx and stunnel in one run.
#
# Runs the shared peer benchmark ../shared/bench/peers.sh (beside the repository root; read its
# header for ports, loads and columns) with our chain as a candidate, one per --protocol:
#
#   wrk -> outbound `meshid proxy run` :OUT_PORT (18001) -> mTLS -> inbound `meshid proxy run`
#       :IN_PORT (18443) -> app (nginx) :APP_PORT (18080)
#
# The candidate command (run by peers.sh in its own session, with APP_PORT OUT_PORT IN_PORT
# CERT_DIR CA_CERT SERVER_CERT SERVER_KEY CLIENT_CERT CLIENT_KEY SERVER_SPIFFE_ID CLIENT_SPIFFE_ID
# exported) calls this script back as `proxy.sh __candidate ...`, which writes two configs into
# $CERT_DIR/../cand-<name>/ (next to peers.sh's certs/ and logs/) and runs, in the foreground,
# `.venv/bin/meshid proxy run --config in.yaml & exec .venv/bin/meshid proxy run --config out.yaml`:
#   in.yaml   inbound  127.0.0.1:IN_PORT -> 127.0.0.1:APP_PORT, identity {SERVER_CERT, SERVER_KEY,
#             bundle CA_CERT}, admin on --admin-in (default 127.0.0.1:15101)
#   out.yaml  outbound 127.0.0.1:OUT_PORT -> 127.0.0.1:IN_PORT, expect_ids [SERVER_SPIFFE_ID],
#             identity {CLIENT_CERT, CLIENT_KEY, bundle CA_CERT}, admin on --admin-out (15102)
#   both: trust_domain example.org, the default posture (all-authenticated: SPIFFE verification
#   and the authz filter run, no policy file), metrics on, access log OFF like the peers' configs
#   (nginx `access_log off`, HAProxy logs errors only); --access-log writes one JSON line per
#   connection (tcp) or request (http) to in.access.log / out.access.log in that folder.
#   Proxy stderr: peers.sh's logs/<name>.out.
#
# Certificates: peers.sh's own openssl certificates are used as they are. They are valid
# X509-SVIDs (exactly one URI SAN - the server's extra DNS/IP SANs are allowed -, basicConstraints
# critical CA:FALSE, keyUsage critical digitalSignature, EKU serverAuth+clientAuth, signed
# directly by ca.pem, which carries no SPIFFE ID and so is the bundle of our trust_domain) and
# pass tls_proxy.spiffe_verify unchanged in both directions (checked 2026-11-26), so no SVIDs of
# our own are minted.
#
# While peers.sh runs, this script samples VmRSS/VmHWM of each meshid process every 0.5 s (bash
# builtins and a sleep) and prints RSS per proxy after the table: peers.sh reports only the sum
# over a candidate's session ("rss ... tot").
#
# USAGE
#   bench/proxy.sh [--protocol LIST] [-n NAME] [--ref REV] [--access-log]
#                  [--admin-in HOST:PORT] [--admin-out HOST:PORT] [PEERS.SH OPTIONS...]
#   --protocol  tcp (default), http or auto, or a comma-separated list (tcp,http): one candidate
#               per protocol in the same run, named meshid-l4 (tcp) and meshid-<protocol>
#   -n NAME     candidate name in the table (one protocol only)
#   --ref REV   measure the code of git revision REV instead of the working tree: exported with
#               `git archive` into the work dir and put first on PYTHONPATH for the project's
#               .venv (whose editable install would otherwise load the working tree). Use it
#               when the working tree is mid-edit, and to reproduce a recorded figure.
#   --access-log  turn the proxies' access log on (to files), to measure its cost
#   Anything else goes to peers.sh; without -t the topologies are "direct haproxy nginx stunnel".
#   peers.sh refuses a plan over PEERS_MAX_SECONDS (290 s): with the default 10 s loads that is
#   at most 7 topologies including our candidates.
#   Needs root on first use (peers.sh apt-installs haproxy nginx stunnel4 wrk).
#   Examples: bench/proxy.sh                         # ~3 minutes with the defaults
#             bench/proxy.sh --ref HEAD --protocol tcp,http -t "direct haproxy nginx stunnel haproxy-l4"
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(git -C "$(dirname "$SELF")" rev-parse --show-toplevel 2>/dev/null) || {
  echo "bench/proxy.sh: not inside the meshid git repository" >&2; exit 1; }
MESHID=$ROOT/.venv/bin/meshid

# ---------------------------------------------------------------- candidate (inside peers.sh)
if [[ ${1:-} == __candidate ]]; then
  # __candidate PROTOCOL NAME ADMIN_IN ADMIN_OUT ACCESS_LOG(0|1) [SRC]; the rest: peers.sh's env
  proto=$2 name=$3 admin_in=$4 admin_out=$5 access=$6 src=${7:-}
  for v in APP_PORT OUT_PORT IN_PORT CERT_DIR CA_CERT SERVER_CERT SERVER_KEY CLIENT_CERT \
           CLIENT_KEY SERVER_SPIFFE_ID; do
    [[ -n ${!v:-} ]] || { echo "proxy.sh __candidate: $v is not set (run by peers.sh only)" >&2; exit 1; }
  done
  # --ref: the exported tree comes first on sys.path (the editable install's finder comes last)
  [[ -n $src ]] && export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}
  dir=$(dirname "$CERT_DIR")/cand-$name
  mkdir -p "$dir" || exit 1
  log_in=null log_out=null
  ((access)) && log_in="\"$dir/in.access.log\"" log_out="\"$dir/out.access.log\""
  cat > "$dir/in.yaml" <<EOF
# written by bench/proxy.sh for peers.sh candidate $name
trust_domain: example.org
identity: {cert: "$SERVER_CERT", key: "$SERVER_KEY", bundle: "$CA_CERT"}
admin: {listen: "$admin_in"}
inbound:
  - {name: bench-in, listen: "127.0.0.1:$IN_PORT", forward: "127.0.0.1:$APP_PORT", protocol: $proto}
access_log: {path: $log_in}
EOF
  cat > "$dir/out.yaml" <<EOF
# written by bench/proxy.sh for peers.sh candidate $name
trust_domain: example.org
identity: {cert: "$CLIENT_CERT", key: "$CLIENT_KEY", bundle: "$CA_CERT"}
admin: {listen: "$admin_out"}
outbound:
  - {name: bench-out, listen: "127.0.0.1:$OUT_PORT", upstream: ["127.0.0.1:$IN_PORT"],
     expect_ids: ["$SERVER_SPIFFE_ID"], protocol: $proto}
access_log: {path: $log_out}
EOF
  "$MESHID" proxy run --config "$dir/in.yaml" &
  echo $! > "$dir/in.pid"
  echo $$ > "$dir/out.pid"   # exec keeps this PID
  exec "$MESHID" proxy run --config "$dir/out.yaml"
fi

# ---------------------------------------------------------------- driver
PEERS=$ROOT/../shared/bench/peers.sh
PROTOS=tcp NAME= REF= ACCESS=0 ADMIN_IN=127.0.0.1:15101 ADMIN_OUT=127.0.0.1:15102
PASS=() HAVE_T=0 WORKDIR=${TMPDIR:-/tmp}/peerbench/run
while (($#)); do
  case $1 in
    --protocol) PROTOS=${2:-}; shift 2 ;;
    -n) NAME=${2:-}; shift 2 ;;
    --ref) REF=${2:-}; shift 2 ;;
    --access-log) ACCESS=1; shift ;;
    --admin-in) ADMIN_IN=${2:-}; shift 2 ;;
    --admin-out) ADMIN_OUT=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -t) HAVE_T=1; PASS+=("$1" "${2:-}"); shift 2 ;;
    -w) WORKDIR=${2:-}; PASS+=("$1" "${2:-}"); shift 2 ;;
    -[dCr]|-c) PASS+=("$1" "${2:-}"); shift 2 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
IFS=', ' read -r -a PROTO_LIST <<< "$PROTOS"
((${#PROTO_LIST[@]})) || { echo "bench/proxy.sh: --protocol needs tcp, http or auto" >&2; exit 2; }
NAMES=()
for p in "${PROTO_LIST[@]}"; do
  case $p in tcp) NAMES+=(meshid-l4) ;; http|auto) NAMES+=("meshid-$p") ;;
    *) echo "bench/proxy.sh: --protocol: expected tcp, http or auto (got '$p')" >&2; exit 2 ;; esac
done
if [[ -n $NAME ]]; then
  ((${#PROTO_LIST[@]} == 1)) || { echo "bench/proxy.sh: -n NAME needs a single --protocol" >&2; exit 2; }
  [[ $NAME =~ ^[A-Za-z0-9._-]+$ ]] || { echo "bench/proxy.sh: -n NAME: letters, digits, . _ - only" >&2; exit 2; }
  NAMES=("$NAME")
fi
if [[ ! -f $PEERS ]]; then
  echo "bench/proxy.sh: the shared peer benchmark is missing: expected $(realpath -m "$PEERS")" >&2
  echo "  (../shared/bench/peers.sh beside the repository root $ROOT)" >&2
  exit 1
fi
[[ -x $MESHID ]] || { echo "bench/proxy.sh: $MESHID not found; create the project's .venv first" >&2; exit 1; }
((HAVE_T)) || PASS=(-t "direct haproxy nginx stunnel" "${PASS[@]}")

SRC=
if [[ -n $REF ]]; then
  sha=$(git -C "$ROOT" rev-parse --verify --quiet "$REF^{commit}") || {
    echo "bench/proxy.sh: --ref $REF: not a commit" >&2; exit 2; }
  SRC=$WORKDIR/meshid-src-${sha:0:12}
  if [[ ! -f $SRC/.complete ]]; then
    rm -rf "$SRC" && mkdir -p "$SRC" &&
      git -C "$ROOT" archive --format=tar "$sha" | tar -x -C "$SRC" && touch "$SRC/.complete" || {
      echo "bench/proxy.sh: could not export $sha into $SRC" >&2; exit 1; }
  fi
  echo "bench/proxy.sh: measuring commit $sha (exported to $SRC), not the working tree" >&2
else
  echo "bench/proxy.sh: measuring the working tree of $ROOT ($(git -C "$ROOT" rev-parse --short HEAD)$(
    git -C "$ROOT" diff --quiet HEAD -- tls_proxy meshid ca authz 2>/dev/null || echo ' + uncommitted changes'))" >&2
fi

CAND_ARGS=()
for i in "${!PROTO_LIST[@]}"; do
  p=${PROTO_LIST[$i]} n=${NAMES[$i]}
  mkdir -p "$WORKDIR/cand-$n" && rm -f "$WORKDIR/cand-$n/in.pid" "$WORKDIR/cand-$n/out.pid"
  CAND_ARGS+=(-n "$n" -c "$(printf 'exec %q __candidate %q %q %q %q %q %q' "$SELF" "$p" "$n" \
    "$ADMIN_IN" "$ADMIN_OUT" "$ACCESS" "$SRC")")
  echo "bench/proxy.sh: candidate $n = two \`meshid proxy run\` (protocol $p), configs in $WORKDIR/cand-$n" >&2
done
RSSLOG=$(mktemp "${TMPDIR:-/tmp}/meshid-proxy-rss.XXXXXX")

# sample RSS of our proxies every 0.5 s: PIDs from the files each candidate writes, checked
# against /proc/PID/cmdline with bash builtins (one `sleep` per sample is the only fork)
sample_rss() {
  local n dir role pid args k v rss hwm
  while :; do
    for n in "${NAMES[@]}"; do
      dir=$WORKDIR/cand-$n
      for role in in out; do
        pid=
        [[ -r $dir/$role.pid ]] && read -r pid < "$dir/$role.pid"
        [[ -n $pid ]] || continue
        { mapfile -d '' args < "/proc/$pid/cmdline"; } 2>/dev/null || continue
        [[ " ${args[*]} " == *" $dir/$role.yaml "* ]] || continue
        rss=0 hwm=0
        { while read -r k v _; do
            case $k in VmRSS:) rss=$v ;; VmHWM:) hwm=$v ;; esac
          done < "/proc/$pid/status"; } 2>/dev/null
        ((rss)) && echo "$n $role $rss $hwm" >> "$RSSLOG"
      done
    done
    sleep 0.5
  done
}
sample_rss & SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null; rm -f "$RSSLOG"' EXIT

bash "$PEERS" "${PASS[@]}" "${CAND_ARGS[@]}"
rc=$?
kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null
if [[ -s $RSSLOG ]]; then
  echo
  echo "RSS per meshid proxy (MiB, sampled every 0.5 s while it ran): max VmRSS / peak VmHWM"
  awk '{ k = $1 " " $2; if ($3 > r[k]) r[k] = $3; if ($4 > h[k]) h[k] = $4 }
       END { for (k in r) { split(k, kk, " ")
             printf "  %-13s %-3s  %6.1f / %6.1f\n", kk[1], kk[2], r[k] / 1024, h[k] / 1024 } }' "$RSSLOG" | sort
fi
exit "$rc"
