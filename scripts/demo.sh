#!/usr/bin/env bash
# The main job, locally: build ferry, create a two-site cluster (a primary and a hot
# standby on loopback, QUIC with mutual TLS), start both, write through a real NBD
# client, wait until the standby has everything, compare the images, show the status,
# and leave both running for you to try things until Ctrl-C.
#
#   ./scripts/demo.sh                      # ./demo-data, NBD on 127.0.0.1:10809 (dr1: 10810), async
#   MODE=sync DEMO_DIR=/tmp/x NBD=127.0.0.1:20809 ./scripts/demo.sh
#
# A rerun reuses the cluster in DEMO_DIR (and says so): whichever node is the primary
# now (after a switchover or a promote) takes the writes. FERRY_BIN=DIR uses binaries
# already built there instead of building; DEMO_ONESHOT=1 stops both daemons after the
# check instead of waiting for Ctrl-C (the test that runs this script uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/demo-data}
NBD=${NBD:-127.0.0.1:10809}
PRIMARY_QUIC=${PRIMARY_QUIC:-127.0.0.1:17001}
STANDBY_QUIC=${STANDBY_QUIC:-127.0.0.1:17002}
MODE=${MODE:-async}
VOLUME=${VOLUME:-vol0:1GiB}
# Metrics endpoints on loopback: the primary's here, dr1's on the next port (0: any).
METRICS_PORT=${METRICS_PORT:-9640}
VOL=${VOLUME%%:*}
NODES=(primary dr1)

if [ -n "${FERRY_BIN:-}" ]; then
  BIN=$FERRY_BIN
else
  cargo build --release -q -p ferryd -p ferryctl
  # Wherever cargo puts its output: CARGO_TARGET_DIR, build.target-dir, or ./target.
  BIN=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release
fi
for b in ferryd ferryctl; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b is missing" >&2; exit 1; }
done

if [ -f "$DEMO_DIR/primary.toml" ]; then
  echo "== reusing the cluster in $DEMO_DIR (delete that directory for a fresh one)"
else
  "$BIN/ferryctl" init --dir "$DEMO_DIR" --volume "$VOLUME" --nbd "$NBD" --journal-size 512MiB \
    --primary "$PRIMARY_QUIC" --standby "dr1=$STANDBY_QUIC" --mode "$MODE" \
    --metrics-port "$METRICS_PORT"
fi

# Every ferryd running one of this cluster's configs, also one restarted by hand after
# the `kill -9` suggested below: Ctrl-C stops them all.
demo_pids() {
  local n
  for n in "${NODES[@]}"; do pgrep -f -- "ferryd --config $DEMO_DIR/$n.toml" || true; done
}
stop_all() {
  local pids
  pids=$(demo_pids)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 300); do
      [ -z "$(demo_pids)" ] && break
      sleep 0.1
    done
  fi
  echo "ferryd stopped"
}
if [ -n "$(demo_pids)" ]; then
  echo "demo: ferryd already runs on $DEMO_DIR (pids $(demo_pids | tr '\n' ' ')); stop it first" >&2
  exit 1
fi
for n in "${NODES[@]}"; do
  "$BIN/ferryd" --config "$DEMO_DIR/$n.toml" 2>>"$DEMO_DIR/$n.log" &
done
trap stop_all EXIT
trap 'exit 130' INT TERM

ctl() { "$BIN/ferryctl" --config "$DEMO_DIR/$1.toml" "${@:2}"; }
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)'"$1"')'; }
for n in "${NODES[@]}"; do
  for i in $(seq 150); do
    ctl "$n" status --json >/dev/null 2>&1 && break
    [ "$i" = 150 ] && { echo "demo: $n did not come up; its log:" >&2; tail -5 "$DEMO_DIR/$n.log" >&2; exit 1; }
    sleep 0.1
  done
done
# The primary is whichever node says so now: a switchover or promote swaps the roles.
PRIMARY='' STANDBY=''
for n in "${NODES[@]}"; do
  case $(ctl "$n" status --json | json_field '["role"]') in
    primary) PRIMARY=$n ;;
    *) STANDBY=$n ;;
  esac
done
if [ -z "$PRIMARY" ] || [ -z "$STANDBY" ]; then
  echo "demo: expected one primary and one standby in $DEMO_DIR; status says otherwise:" >&2
  for n in "${NODES[@]}"; do ctl "$n" status >&2 || true; done
  exit 1
fi

# Each node has its own NBD port (init gives a standby on the primary's host the next
# one): ask the primary where it serves.
URL="nbd://$(ctl "$PRIMARY" status --json | json_field '["nbd"]["listen"]')/$VOL"
P="$BIN/ferryctl --config $DEMO_DIR/$PRIMARY.toml"
S="$BIN/ferryctl --config $DEMO_DIR/$STANDBY.toml"
echo "== $PRIMARY (primary) serves $URL; $STANDBY is its standby"
if command -v qemu-io >/dev/null; then
  echo "== writing 64 MiB of patterns through qemu-io"
  qemu-io -f raw -c 'write -P 0x5a 0 32M' -c 'write -P 0xa5 512M 32M' -c flush "$URL" | grep -E '^wrote'
fi
echo "== waiting for the standby to acknowledge and apply everything"
durable_p=$($P status --json | json_field '["durable_seq"]')
for i in $(seq 600); do
  applied_s=$($S status --json | json_field '["applied_seq"]')
  [ "$applied_s" -ge "$durable_p" ] && break
  [ "$i" = 600 ] && { echo "demo: the standby applied $applied_s of $durable_p after 60 s" >&2; exit 1; }
  sleep 0.1
done
echo "== status ($PRIMARY, then $STANDBY)"
$P status
$S status
if cmp -s "$DEMO_DIR/$PRIMARY/$VOL.img" "$DEMO_DIR/$STANDBY/$VOL.img"; then
  echo "== replica is byte-identical to the primary's volume"
else
  echo "== replica differs from the primary's volume!" >&2
  exit 1
fi
[ "${DEMO_ONESHOT:-}" = 1 ] && exit 0
cat <<MSG

Try next (in another terminal):
  qemu-io -f raw -c 'write -P 0xab 1M 4k' -c 'read -v 1M 16' $URL
  $P status          $S status --json
  pkill -9 -f 'ferryd --config $DEMO_DIR/$STANDBY.toml'   # kill the standby, write more, then restart it:
  $BIN/ferryd --config $DEMO_DIR/$STANDBY.toml 2>>$DEMO_DIR/$STANDBY.log &   # it catches up from the journal
  cmp $DEMO_DIR/$PRIMARY/$VOL.img $DEMO_DIR/$STANDBY/$VOL.img
  $P verify                                  # compare both sides at one point, writes may continue
  $P bookmark create before-test             # a named recovery point, then write more and:
  $S pit export --volume $VOL --bookmark before-test --listen 127.0.0.1:0   # the volume as it was
  $S pit unexport
  $P switchover      # planned role swap: $STANDBY becomes the primary (on its own NBD port), this one its standby;
                     # rerun this script afterwards and it writes through the new primary

Ctrl-C stops both daemons cleanly (drain, checkpoint, exit 0), also one restarted by hand.
MSG
while [ -n "$(demo_pids)" ]; do sleep 1; done
