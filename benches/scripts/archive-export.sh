#!/usr/bin/env bash
# Time from `ferryctl archive export` start to the first NBD read done, for a sparse
# volume of SIZE with some data (issue 20's target: under 2 s, whatever the size).
# A primary archives to file://DIR/archive (or to $ARCHIVE_URL, e.g. an s3:// URL
# with the AWS_* environment set), is stopped, then each export is timed 3 times.
#   benches/scripts/archive-export.sh SIZE [BIN_DIR]   e.g. 8GiB target/release
set -euo pipefail
size=${1:?usage: archive-export.sh SIZE [BIN_DIR]}
bin=${2:-${CARGO_TARGET_DIR:-target}/debug}
dir=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-archive-export.XXXXXX")
pid=""
exp=""
cleanup() {
  for p in $pid $exp; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
url=${ARCHIVE_URL:-file://$dir/archive}
nbd=127.0.0.1:$(port)
"$bin/ferryctl" init --dir "$dir" --volume "vol0:$size" --nbd "$nbd" --journal-size 256MiB \
  --primary "127.0.0.1:$(port)" --standby "dr1=127.0.0.1:$(port)" >/dev/null
start_ferryd() {
  "$bin/ferryd" --config "$dir/primary.toml" >"$dir/ferryd.out" 2>>"$dir/ferryd.log" &
  pid=$!
  until grep -q "ferryd ready" "$dir/ferryd.out"; do sleep 0.2; done
}
stop_ferryd() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
bytes=$(numfmt --from=iec-i "${size%B}")
# Some data in the base (64 × 64 KiB spread over the volume, written before the archive
# is added) and some in packs after it (1000 scattered 4 KiB writes).
start_ferryd
cmds=()
for i in $(seq 0 63); do cmds+=(-c "write -P 7 $(( (bytes / 64 * i) / 65536 * 65536 )) 64k"); done
qemu-io -f raw "${cmds[@]}" -c flush "nbd://$nbd/vol0" >/dev/null
stop_ferryd
printf '\n[[replication.target]]\nname = "cold"\nkind = "archive"\nurl = "%s"\nflush_interval = 1\n' \
  "$url" >>"$dir/primary.toml"
start_ferryd
cmds=()
for i in $(seq 1 1000); do cmds+=(-c "write -P 9 $(( (i * 7919 * 1048576 + i * 4096) % bytes / 4096 * 4096 )) 4k"); done
qemu-io -f raw "${cmds[@]}" -c flush "nbd://$nbd/vol0" >/dev/null
status() { "$bin/ferryctl" --config "$dir/primary.toml" status --json; }
durable=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["durable_seq"])')
until status | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if s['archives'][0]['archived_seq'] >= $durable else 1)"; do
  sleep 0.5
done
stop_ferryd
"$bin/ferryctl" archive list --url "$url"
for round in 1 2 3; do
  rm -f "$dir/export.out"
  start=$(date +%s.%N)
  "$bin/ferryctl" archive export --url "$url" --latest --listen 127.0.0.1:0 --json \
    >"$dir/export.out" 2>"$dir/export.err" &
  exp=$!
  until [ -s "$dir/export.out" ]; do sleep 0.01; done
  line=$(head -1 "$dir/export.out")
  # Not python: its start alone (pyenv shims) can take longer than the export's.
  uri=$(sed -n 's/.*"uri":"\([^"]*\)".*/\1/p' <<<"$line")
  qemu-io -r -f raw -c "read -P 7 $(( bytes / 64 * 5 / 65536 * 65536 + 8192 )) 4k" "$uri" | grep -q "read 4096/4096"
  end=$(date +%s.%N)
  # The client's own share (qemu-io start, connect, handshake): the same read again.
  again=$(date +%s.%N)
  qemu-io -r -f raw -c "read -P 7 $(( bytes / 64 * 5 / 65536 * 65536 + 8192 )) 4k" "$uri" | grep -q "read 4096/4096"
  client=$(python3 -c "print($(date +%s.%N) - $again)")
  opened=$(sed -n 's/.*"open_seconds":\([0-9.e-]*\).*/\1/p' <<<"$line")
  indexed=$(sed -n 's/.*"indexes_read":\([0-9]*\).*/\1/p' <<<"$line")
  whole=$(sed -n 's/.*"packs_read":\([0-9]*\).*/\1/p' <<<"$line")
  read_bytes=$(sed -n 's/.*"bytes_read":\([0-9]*\).*/\1/p' <<<"$line")
  kill "$exp"; wait "$exp" 2>/dev/null || true; exp=""
  printf 'size %s round %d: start to first read done %.3f s (index opened in %.3f s: %s pack indexes and %s whole packs, %s bytes read; the same read from a running export %.3f s)\n' \
    "$size" "$round" "$(python3 -c "print($end - $start)")" "$opened" "${indexed:-0}" "${whole:-?}" "${read_bytes:-?}" "$client"
done
