#!/usr/bin/env bash
# The main job, locally: build ferry, create a two-site cluster (a primary and a hot
# standby on loopback, QUIC with mutual TLS), start both, write through a real NBD
# client, wait until the standby has everything, compare the images, show the status,
# and leave both running for you to try things until Ctrl-C.
#
#   ./scripts/demo.sh                      # ./demo-data, NBD on 127.0.0.1:10809, async
#   MODE=sync DEMO_DIR=/tmp/x NBD=127.0.0.1:20809 ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/demo-data}
NBD=${NBD:-127.0.0.1:10809}
PRIMARY_QUIC=${PRIMARY_QUIC:-127.0.0.1:17001}
STANDBY_QUIC=${STANDBY_QUIC:-127.0.0.1:17002}
MODE=${MODE:-async}
VOLUME=${VOLUME:-vol0:1GiB}
VOL=${VOLUME%%:*}

cargo build --release -q -p ferryd -p ferryctl
BIN=$PWD/target/release
if [ ! -f "$DEMO_DIR/primary.toml" ]; then
  "$BIN/ferryctl" init --dir "$DEMO_DIR" --volume "$VOLUME" --nbd "$NBD" --journal-size 512MiB \
    --primary "$PRIMARY_QUIC" --standby "dr1=$STANDBY_QUIC" --mode "$MODE"
fi
"$BIN/ferryd" --config "$DEMO_DIR/dr1.toml" 2>"$DEMO_DIR/dr1.log" &
SPID=$!
"$BIN/ferryd" --config "$DEMO_DIR/primary.toml" 2>"$DEMO_DIR/primary.log" &
PPID_=$!
trap 'kill -TERM $PPID_ $SPID 2>/dev/null; wait $PPID_ $SPID 2>/dev/null; echo "ferryd stopped"' EXIT
for sock in primary/ferryd.sock dr1/ferryd.sock; do
  for _ in $(seq 100); do
    [ -S "$DEMO_DIR/$sock" ] && break
    kill -0 $PPID_ 2>/dev/null && kill -0 $SPID 2>/dev/null || { tail -5 "$DEMO_DIR"/*.log; exit 1; }
    sleep 0.1
  done
done
URL="nbd://$NBD/$VOL"
P="$BIN/ferryctl --config $DEMO_DIR/primary.toml"
S="$BIN/ferryctl --config $DEMO_DIR/dr1.toml"
echo "== primary serves $URL; standby dr1 listens on $STANDBY_QUIC ($MODE)"
if command -v qemu-io >/dev/null; then
  echo "== writing 64 MiB of patterns through qemu-io"
  qemu-io -f raw -c 'write -P 0x5a 0 32M' -c 'write -P 0xa5 512M 32M' -c flush "$URL" | grep -E '^wrote'
fi
echo "== waiting for the standby to acknowledge and apply everything"
for _ in $(seq 600); do
  lag=$($P status --json | python3 -c 'import json,sys; t=json.load(sys.stdin)["targets"][0]; print(t["lag_bytes"], t["state"])')
  [ "${lag%% *}" = 0 ] && break
  sleep 0.1
done
applied_p=$($P status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["durable_seq"])')
for _ in $(seq 600); do
  applied_s=$($S status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["applied_seq"])')
  [ "$applied_s" -ge "$applied_p" ] && break
  sleep 0.1
done
echo "== status (primary, then standby)"
$P status
$S status
if cmp -s "$DEMO_DIR/primary/$VOL.img" "$DEMO_DIR/dr1/$VOL.img"; then
  echo "== replica is byte-identical to the primary's volume"
else
  echo "== replica differs from the primary's volume!" >&2
  exit 1
fi
cat <<MSG

Try next (in another terminal):
  qemu-io -f raw -c 'write -P 0xab 1M 4k' -c 'read -v 1M 16' $URL
  $P status          $S status --json
  kill -9 $SPID      # stop the standby, write more, restart it: it catches up from the journal
  cmp $DEMO_DIR/primary/$VOL.img $DEMO_DIR/dr1/$VOL.img
  $P verify                                  # compare both sides at one point, writes may continue
  $P bookmark create before-test             # a named recovery point, then write more and:
  $S pit export --volume $VOL --bookmark before-test --listen 127.0.0.1:0   # the volume as it was
  $S pit unexport
  $P switchover      # planned role swap: dr1 becomes the primary (NBD on $NBD of its host), this one its standby

Ctrl-C stops both daemons cleanly (drain, checkpoint, exit 0).
MSG
wait $PPID_ $SPID
