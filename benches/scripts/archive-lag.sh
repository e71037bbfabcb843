#!/usr/bin/env bash
# Archive lag under sustained 4 KiB random writes at queue depth 32 (issue 20's target:
# p99 under 10 s), then restore MB/s of the result. A primary (one 1 GiB volume by
# default) archives to file://DIR/archive (or $ARCHIVE_URL with the AWS_* environment);
# fio's nbd engine writes for SECONDS while `ferryctl status --json` is sampled every
# second (the metric ferry_archive_lag_seconds, status' archives[0].lag_seconds: the age
# of the newest archived write-set while the archive is behind, 0 when it holds
# everything); then `ferryctl archive restore
# --latest` is timed and compared with the primary's volume.
#   benches/scripts/archive-lag.sh [SECONDS] [BIN_DIR] [SIZE]   e.g. 60 target/release 1GiB
set -euo pipefail
secs=${1:-60}
warmup=${WARMUP:-5}
bin=${2:-${CARGO_TARGET_DIR:-target}/debug}
size=${3:-1GiB}
dir=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-archive-lag.XXXXXX")
pid=""
fio_pid=""
cleanup() {
  for p in $fio_pid $pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
url=${ARCHIVE_URL:-file://$dir/archive}
nbd=127.0.0.1:$(port)
metrics=127.0.0.1:$(port)
"$bin/ferryctl" init --dir "$dir" --volume "vol0:$size" --nbd "$nbd" --journal-size 1GiB \
  --metrics-port "${metrics#*:}" --primary "127.0.0.1:$(port)" --standby "dr1=127.0.0.1:$(port)" >/dev/null
# The archive is the primary's only target: init's standby is dropped (a hot target
# that never connects would hold the journal until it fills).
sed -i '/^\[\[replication.target\]\]$/,/^$/d' "$dir/primary.toml"
printf '\n[[replication.target]]\nname = "cold"\nkind = "archive"\nurl = "%s"\nflush_interval = 1\n' \
  "$url" >>"$dir/primary.toml"
"$bin/ferryd" --config "$dir/primary.toml" >"$dir/ferryd.out" 2>>"$dir/ferryd.log" &
pid=$!
until grep -q "ferryd ready" "$dir/ferryd.out"; do
  kill -0 "$pid" 2>/dev/null || { cat "$dir/ferryd.log" >&2; exit 1; }
  sleep 0.2
done
status() { "$bin/ferryctl" --config "$dir/primary.toml" status --json; }
until status | python3 -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['archives'][0]['state'] == 'archiving' else 1)"; do
  sleep 0.5
done
fio --name=lag --ioengine=nbd "--uri=nbd://$nbd/vol0" --rw=randwrite --bs=4k --iodepth=32 \
  "--size=$size" --time_based "--runtime=$secs" --output-format=json "--output=$dir/fio.json" 2>"$dir/fio.err" &
fio_pid=$!
: >"$dir/lag.txt"
while kill -0 "$fio_pid" 2>/dev/null; do
  # "time lag": the first WARMUP seconds are left out below (the first samples' lag
  # counts the idle time before fio, since the base's point).
  now=$(date +%s.%N)
  lag=$(curl -s "http://$metrics/metrics" | sed -n 's/^ferry_archive_lag_seconds{target="cold"} //p')
  echo "$now ${lag:-nan}" >>"$dir/lag.txt"
  sleep 1
done
wait "$fio_pid" || { cat "$dir/fio.err" >&2; exit 1; }
fio_pid=""
durable=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["durable_seq"])')
drained=$(date +%s.%N)
until status | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if s['archives'][0]['archived_seq'] >= $durable else 1)"; do
  sleep 0.2
done
drain=$(python3 -c "print($(date +%s.%N) - $drained)")
python3 - "$dir/fio.json" "$dir/lag.txt" "$drain" "$warmup" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]["write"]
rows = [l.split() for l in open(sys.argv[2]) if len(l.split()) == 2]
t0 = float(rows[0][0]) if rows else 0.0
lag = sorted(float(v) for t, v in rows if float(t) - t0 >= float(sys.argv[4]) and v != "nan")
pct = lambda p: lag[min(len(lag) - 1, int(p * len(lag)))]
print(f"fio randwrite 4k qd32: {job['iops']:.0f} IOPS, {job['bw_bytes'] / 1e6:.1f} MB/s")
print(f"archive lag over {len(lag)} samples after {sys.argv[4]} s of warm-up: p50 {pct(0.5):.2f} s, p99 {pct(0.99):.2f} s, max {lag[-1]:.2f} s;"
      f" caught up {float(sys.argv[3]):.2f} s after fio stopped")
EOF
"$bin/ferryctl" --config "$dir/primary.toml" status | grep -A2 '^archive' || true
qemu-img convert -f raw -O raw "nbd://$nbd/vol0" "$dir/want.img"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
"$bin/ferryctl" archive list --url "$url" | sed -n '1,6p'
start=$(date +%s.%N)
"$bin/ferryctl" archive restore --url "$url" --volume vol0 --latest --to "$dir/restored.img" --json >"$dir/restore.json"
end=$(date +%s.%N)
cmp "$dir/want.img" "$dir/restored.img"
bytes=$(stat -c %s "$dir/restored.img")
python3 - "$dir/restore.json" "$bytes" "$start" "$end" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
n, t = int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3])
print(f"restore --latest: {n / 2**20:.0f} MiB in {t:.2f} s = {n / t / 1e6:.1f} MB/s of volume"
      f" ({r['bytes_downloaded'] / t / 1e6:.1f} MB/s downloaded; {r['packs_read']} packs read,"
      f" {r['packs_skipped']} not needed, {r['write_sets_applied']} write-sets); equal to the primary's volume")
EOF
