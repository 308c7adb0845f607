#!/usr/bin/env bash
# Benchmarks nvmirror against a plain directory and bindfs (FUSE passthrough, no mirroring),
# side by side in one run, with the shared peer harness (shared/bench/peerbench.sh):
#
#   sudo tests/bench/run.sh [ROUNDS]           # default 1 round
#   WORKLOADS="seqwrite randfsync meta" SEQ_SIZE=1G tests/bench/run.sh 3
#   WRITEBACK=1 tests/bench/run.sh              # plus a source with --writeback-cache
#
# fs-dest and fs-source run from a release build on loopback with NVRAM on /dev/shm. Prints the
# raw lines and a summary with ratios to the plain directory (see shared/bench/summarize.py).
# Needs root (FUSE mounts) and fio + bindfs (installed with apt-get if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=${PEERBENCH_DIR:-$ROOT/../shared/bench}
[ -f "$BENCH/peerbench.sh" ] || { echo "bench: $BENCH/peerbench.sh not found (set PEERBENCH_DIR)"; exit 1; }
ROUNDS=${1:-1}
export WORKLOADS=${WORKLOADS:-seqwrite randfsync meta}
export UNITS=${UNITS:-seqwrite randfsync meta}

need=()
command -v fio >/dev/null || need+=(fio)
command -v bindfs >/dev/null || need+=(bindfs)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --bins -q
BIN=$ROOT/target/release
W=$(mktemp -d /tmp/nvmirror-bench.XXXXXX)
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{native,bind-backing,bind-mnt,backing,mnt,dest,run}
pids=()
cleanup() {
  for m in "$W/mnt" "$W/mnt-wb" "$W/bind-mnt"; do umount -l "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" /dev/shm/nvmirror-bench-$$-*
}
trap cleanup EXIT

wait_line() { # FILE PATTERN
  for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "bench: timed out waiting for '$2' in $1"; cat "$1"; exit 1
}

"$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name bench >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name benchwb >/dev/null
"$BIN/fs-dest" serve --root "$W/dest" --listen 127.0.0.1:0 --nvram /dev/shm/nvmirror-bench-$$-dest \
  --tls "$W/tls" >"$W/dest.out" 2>"$W/dest.err" &
pids+=($!)
wait_line "$W/dest.out" listening
addr=$(sed -n 's/^fs-dest: listening on //p' "$W/dest.out")
"$BIN/fs-source" mount --backing "$W/backing" --mountpoint "$W/mnt" --dest "$addr" --name bench \
  --nvram /dev/shm/nvmirror-bench-$$-source --tls "$W/tls" >"$W/source.out" 2>"$W/source.err" &
pids+=($!)
wait_line "$W/source.out" mounted
systems=(native="$W/native" bindfs="$W/bind-mnt" nvmirror="$W/mnt")
# WRITEBACK=1: also a source mounted with --writeback-cache (writes return from the page cache;
# fsync and close when mirrored), as the column nvmirror-wb.
if [ "${WRITEBACK:-0}" = 1 ]; then
  mkdir -p "$W/backing-wb" "$W/mnt-wb"
  "$BIN/fs-source" mount --backing "$W/backing-wb" --mountpoint "$W/mnt-wb" --dest "$addr" \
    --name benchwb --nvram /dev/shm/nvmirror-bench-$$-source-wb --tls "$W/tls" --writeback-cache \
    >"$W/source-wb.out" 2>"$W/source-wb.err" &
  pids+=($!)
  wait_line "$W/source-wb.out" mounted
  systems+=(nvmirror-wb="$W/mnt-wb")
fi
bindfs -o big_writes "$W/bind-backing" "$W/bind-mnt" 2>/dev/null || bindfs "$W/bind-backing" "$W/bind-mnt"

raw=$W/bench.raw
PEERBENCH_BASE=$W/pb "$BENCH/peerbench.sh" -r "$ROUNDS" -o "$raw" "${systems[@]}"
echo
python3 "$BENCH/summarize.py" "$raw"
echo
"$BIN/fs-source" status --mountpoint "$W/mnt"
# Peak memory of both daemons over the whole run (VmHWM: the resident set's high-water mark).
peak() { awk '/^VmHWM:/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
echo
echo "peak RSS  fs-dest $(peak "${pids[0]}")  fs-source $(peak "${pids[1]}")"
