#!/usr/bin/env bash
# Scaling figures for docs/benchmarks.md (issue 9): sequential write throughput with 1, 4 and 8
# writers, and 4 KiB write+fsync with 1 and 8 jobs, on bindfs and on nvmirror with each NVLOG
# partition size, side by side in one run (bindfs measured between the nvmirror sizes, so a
# ratio compares minutes-apart numbers).
#
#   sudo tests/bench/scaling.sh                      # partition sizes 16M 64M 256M, 1 GiB per writer count
#   PART_SIZES="64M" SEQ_SIZE=512M tests/bench/scaling.sh
#   RAW_OUT=FILE                                     # keep the raw lines (tests/bench/plot.sh)
#
# Lines: "system writers metric value"; then a markdown table and the peak RSS of each pair.
# Release build; NVRAM on /dev/shm; backing, image and bindfs on a fresh journaled ext4 on a loop
# device (BENCH_FS=root: on the disk, $TMPDIR or /tmp; see common.sh, bench_fs).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
[ "$(id -u)" = 0 ] || { echo "scaling.sh: needs root (FUSE mounts)" >&2; exit 1; }
PART_SIZES=${PART_SIZES:-16M 64M 256M}
SEQ_SIZE=${SEQ_SIZE:-1G}
RAND_RUNTIME=${RAND_RUNTIME:-8}
WRITERS=${WRITERS:-1 4 8}
. tests/bench/common.sh
bench_need fio=fio bindfs=bindfs
cargo build --release --bins -q
BIN=${BIN:-$ROOT/target/release}  # BIN=DIR: binaries built elsewhere (A/B runs)
W=$(mktemp -d "${TMPDIR:-/tmp}/nvmirror-scaling.XXXXXX")
bench_fs "$W"   # BENCH_FS=root: the root filesystem instead of a fresh journaled ext4 (common.sh)
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{run,bind-backing,bind-mnt}
pids=()
cleanup() {
  for m in "$W"/mnt-* "$W/bind-mnt"; do umount -l "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bench_fs_release "$W"
  rm -rf "$W" /dev/shm/nvmirror-scaling-$$-*
}
trap cleanup EXIT
raw=${RAW_OUT:-$W/scaling.raw}
rm -f "$raw"
emit() { echo "$*"; echo "$*" >> "$raw"; }
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }

# seq DIR LABEL N: N writers, 1 MiB writes, SEQ_SIZE in all, fsync at the end of each.
seq_write() {
  local dir=$1 label=$2 n=$3 per
  per=$(( $(numfmt --from=iec "$SEQ_SIZE") / n ))
  rm -rf "$dir/scal"; mkdir -p "$dir/scal"; sync
  timeout -k 10 900 fio --name=seq --directory="$dir/scal" --rw=write --bs=1M --size="$per" \
    --numjobs="$n" --group_reporting --ioengine=psync --end_fsync=1 --output-format=json >"$W/fio.json"
  emit "$label $n seqwrite_MB/s $(json "$W/fio.json" 'round(j["jobs"][0]["write"]["bw_bytes"]/1e6,1)')"
  rm -rf "$dir/scal"
}
# randfsync DIR LABEL N: N jobs of 4 KiB random writes + fsync each over their own 64 MiB file.
rand_fsync() {
  local dir=$1 label=$2 n=$3
  rm -rf "$dir/scal"; mkdir -p "$dir/scal"
  timeout -k 10 900 fio --name=lay --directory="$dir/scal" --rw=write --bs=1M --size=64M --numjobs="$n" \
    --ioengine=psync --end_fsync=1 --output-format=terse >/dev/null
  timeout -k 10 900 fio --name=lay --directory="$dir/scal" --rw=randwrite --bs=4k --size=64M \
    --numjobs="$n" --group_reporting --ioengine=psync --fsync=1 --time_based --runtime="$RAND_RUNTIME" \
    --output-format=json >"$W/fio.json"
  emit "$label $n randfsync_IOPS $(json "$W/fio.json" 'round(j["jobs"][0]["write"]["iops"])')"
  emit "$label $n randfsync_p99_us $(json "$W/fio.json" 'round(j["jobs"][0]["sync"]["lat_ns"]["percentile"]["99.000000"]/1e3 + j["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"]/1e3)')"
  rm -rf "$dir/scal"
}
run_all() { # DIR LABEL
  local n
  for n in $WRITERS; do seq_write "$1" "$2" "$n"; done
  for n in 1 8; do rand_fsync "$1" "$2" "$n"; done
}

"$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
bindfs -o big_writes "$W/bind-backing" "$W/bind-mnt" 2>/dev/null || bindfs "$W/bind-backing" "$W/bind-mnt"
peaks=()
i=0
for ps in $PART_SIZES; do
  i=$((i + 1))
  echo "# bindfs (before nvmirror, $ps partitions) $(date +%T)" >&2
  run_all "$W/bind-mnt" bindfs
  name=p$i
  mkdir -p "$W/dest-$name" "$W/backing-$name" "$W/mnt-$name"
  "$BIN/fs-dest" certs issue --dir "$W/tls" --name "$name" >/dev/null
  "$BIN/fs-dest" serve --root "$W/dest-$name" --listen 127.0.0.1:0 --partition-size "$ps" \
    --nvram /dev/shm/nvmirror-scaling-$$-dest-$name --tls "$W/tls" >"$W/dest-$name.out" 2>"$W/dest-$name.err" &
  dpid=$!; pids+=($dpid)
  bench_wait_line "$W/dest-$name.out" listening
  addr=$(sed -n 's/^fs-dest: listening on //p' "$W/dest-$name.out")
  "$BIN/fs-source" mount --backing "$W/backing-$name" --mountpoint "$W/mnt-$name" --dest "$addr" \
    --name "$name" --partition-size "$ps" --nvram /dev/shm/nvmirror-scaling-$$-source-$name --tls "$W/tls" \
    >"$W/source-$name.out" 2>"$W/source-$name.err" &
  spid=$!; pids+=($spid)
  bench_wait_line "$W/source-$name.out" mounted
  echo "# nvmirror, $ps partitions $(date +%T)" >&2
  run_all "$W/mnt-$name" "nvmirror-$ps"
  cps=$("$BIN/fs-source" status --json --mountpoint "$W/mnt-$name" | json /dev/stdin 'j["cp_count"]' 2>/dev/null || echo "?")
  emit "nvmirror-$ps 0 cps $cps"
  peaks+=("nvmirror-$ps: fs-dest $(awk '/^VmHWM:/ {printf "%.0f MiB", $2/1024}' /proc/$dpid/status), fs-source $(awk '/^VmHWM:/ {printf "%.0f MiB", $2/1024}' /proc/$spid/status)")
  umount "$W/mnt-$name" 2>/dev/null || umount -l "$W/mnt-$name"
  kill "$spid" "$dpid" 2>/dev/null || true
  wait "$spid" "$dpid" 2>/dev/null || true
  rm -f /dev/shm/nvmirror-scaling-$$-*
done
echo
python3 - "$raw" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)   # system -> (metric, writers) -> [values]
for line in open(sys.argv[1]):
    sysname, n, metric, value = line.split()
    rows[sysname].setdefault((metric, int(n)), []).append(value)
cols = [("seqwrite_MB/s", n) for n in (1, 4, 8)] + [("randfsync_IOPS", 1), ("randfsync_IOPS", 8), ("randfsync_p99_us", 1), ("randfsync_p99_us", 8)]
print("| system | " + " | ".join(f"{m} ×{n}" for m, n in cols) + " | CPs |")
print("|---" * (len(cols) + 2) + "|")
for s, d in rows.items():
    cells = []
    for c in cols:
        v = d.get(c)
        cells.append("/".join(v) if v else "")
    print(f"| {s} | " + " | ".join(cells) + f" | {'/'.join(d.get(('cps', 0), ['']))} |")
PY
echo
for p in "${peaks[@]}"; do echo "peak RSS  $p"; done
