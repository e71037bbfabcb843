#!/usr/bin/env bash
# The main job, locally: build ferry, create a node with one volume, start ferryd,
# write and read through a real NBD client, show the status, and leave it running
# for you to try things until Ctrl-C.
#
#   ./scripts/demo.sh            # uses ./demo-data, NBD on 127.0.0.1:10809
#   DEMO_DIR=/tmp/x NBD=127.0.0.1:20809 ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/demo-data}
NBD=${NBD:-127.0.0.1:10809}
VOLUME=${VOLUME:-vol0:1GiB}
VOL=${VOLUME%%:*}

cargo build --release -q -p ferryd -p ferryctl
BIN=$PWD/target/release
if [ ! -f "$DEMO_DIR/primary.toml" ]; then
  "$BIN/ferryctl" init --dir "$DEMO_DIR" --volume "$VOLUME" --nbd "$NBD" --journal-size 512MiB
fi
"$BIN/ferryd" --config "$DEMO_DIR/primary.toml" 2>"$DEMO_DIR/ferryd.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; echo "ferryd stopped (exit $?)"' EXIT
for _ in $(seq 100); do
  [ -S "$DEMO_DIR/primary/ferryd.sock" ] && break
  kill -0 $PID 2>/dev/null || { cat "$DEMO_DIR/ferryd.log"; exit 1; }
  sleep 0.1
done
URL="nbd://$NBD/$VOL"
echo "== ferryd is serving $URL (log: $DEMO_DIR/ferryd.log)"
if command -v qemu-io >/dev/null; then
  echo "== writing 16 MiB through qemu-io, then reading it back"
  qemu-io -f raw -c 'write -P 0x5a 0 16M' -c flush -c 'read -P 0x5a 0 16M' "$URL" | grep -E 'wrote|read'
fi
echo "== status"
"$BIN/ferryctl" --config "$DEMO_DIR/primary.toml" status
cat <<MSG

Try next (in another terminal):
  qemu-io -f raw -c 'write -P 0xab 1M 4k' -c 'read -v 1M 16' $URL
  qemu-img info $URL            nbdinfo $URL
  $BIN/ferryctl --config $DEMO_DIR/primary.toml status --json
  kill -9 $PID   # then run this script again: the journal is replayed, nothing acknowledged is lost

Ctrl-C stops ferryd cleanly (drain, checkpoint, exit 0).
MSG
wait $PID
