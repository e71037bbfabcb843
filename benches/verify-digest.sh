#!/bin/bash
# `[verify] digest` throughput, sm3 against xxh3, on a 1 GiB volume: a gm pair on
# loopback, both replicas filled with the same 1 GiB of non-zero data (page cache warm),
# `ferryctl verify --json` three times per digest. Needs `cargo build --release -p ferryd
# -p ferryctl`, python3 and openssl; BIN (default $CARGO_TARGET_DIR/release), DIR (a
# scratch directory, 2 GiB).
set -euo pipefail
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
D=${DIR:-$(mktemp -d)}
mkdir -p "$D"
port() { python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
$BIN/ferryctl init --dir "$D" --volume vol0:1GiB --nbd 127.0.0.1:0 --journal-size 256MiB --segment-size 16MiB \
  --crypto gm --primary 127.0.0.1:$(port) --standby dr1=127.0.0.1:$(port) >/dev/null
# 1 GiB of pseudo-random (incompressible, never zero) data, the same on both sides.
{ openssl enc -aes-128-ctr -pass pass:ferry -nosalt -pbkdf2 </dev/zero 2>/dev/null | head -c $((1<<30)) || true; } > "$D/primary/vol0.img"
cp "$D/primary/vol0.img" "$D/dr1/vol0.img"
cat "$D/primary/vol0.img" "$D/dr1/vol0.img" >/dev/null   # page cache warm: measure hashing, not the disk
start() {
  $BIN/ferryd --config "$D/dr1.toml" >"$D/dr1.$1.out" 2>"$D/dr1.$1.log" & echo $! > "$D/dr1.pid"
  $BIN/ferryd --config "$D/primary.toml" >"$D/primary.$1.out" 2>"$D/primary.$1.log" & echo $! > "$D/primary.pid"
  for i in $(seq 1 600); do
    st=$($BIN/ferryctl --config "$D/primary.toml" status --json 2>/dev/null || true)
    if echo "$st" | python3 -c 'import json,sys;d=json.load(sys.stdin);sys.exit(0 if d["targets"][0]["state"]=="streaming" else 1)' 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "no streaming"; exit 1
}
stop() { kill $(cat "$D/primary.pid") $(cat "$D/dr1.pid"); wait || true; }
for digest in sm3 xxh3; do
  for n in primary dr1; do
    sed -i '/^\[verify\]/,$d' "$D/$n.toml"; printf '\n[verify]\ndigest = "%s"\n' $digest >> "$D/$n.toml"
  done
  start $digest
  for r in 1 2 3; do
    $BIN/ferryctl --config "$D/primary.toml" verify --json | python3 -c "import json,sys;d=json.load(sys.stdin);print('$digest','run',$r,'digest',d['digest'],'identical',d['identical'],'seconds %.3f'%d['seconds'],'MiB/s per side %.0f'%(1024/d['seconds']))"
  done
  stop
done
uptime
