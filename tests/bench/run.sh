#!/usr/bin/env bash
# Benchmarks nvmirror against a plain directory and bindfs (FUSE passthrough, no mirroring),
# side by side in one run, with the shared peer harness (shared/bench/peerbench.sh):
#
#   sudo tests/bench/run.sh [ROUNDS]           # default 1 round
#   WORKLOADS="seqwrite randfsync meta tar" SEQ_SIZE=1G tests/bench/run.sh 3
#   WRITEBACK=1 tests/bench/run.sh              # plus a source with --writeback-cache
#   DISK_NVRAM=1 tests/bench/run.sh             # plus a pair with both NVRAM files on disk
#   GLUSTER=1 tests/bench/run.sh                # plus GlusterFS replica 2 (shared/bench/peers.sh)
#   VARIANT="t1=--threads 1"                    # plus a source with other options (A/B runs)
#   RAW_OUT=FILE                                # keep the raw lines (for tests/bench/plot.sh)
#   BENCH_FS=root                               # on the root filesystem, not a fresh journaled
#                                               # ext4 on a loop device (see common.sh: bench_fs)
#
# fs-dest and fs-source run from a release build on loopback with NVRAM on /dev/shm. Prints the
# raw lines and a summary with ratios to the plain directory (see shared/bench/summarize.py).
# Needs root (FUSE mounts) and fio + bindfs (installed with apt-get if missing; GlusterFS too
# with GLUSTER=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=${PEERBENCH_DIR:-$ROOT/../shared/bench}
[ -f "$BENCH/peerbench.sh" ] || { echo "bench: $BENCH/peerbench.sh not found (set PEERBENCH_DIR)"; exit 1; }
ROUNDS=${1:-1}
export WORKLOADS=${WORKLOADS:-seqwrite randfsync meta tar}
export UNITS=${UNITS:-seqwrite randfsync meta tar}

. tests/bench/common.sh
bench_need fio=fio bindfs=bindfs
if [ "${GLUSTER:-0}" = 1 ]; then bench_need glusterd=glusterfs-server glusterfs=glusterfs-client; fi

cargo build --release --bins -q
BIN=${BIN:-$ROOT/target/release}  # BIN=DIR: binaries built elsewhere (A/B runs)
W=$(mktemp -d /tmp/nvmirror-bench.XXXXXX)
bench_fs "$W"   # BENCH_FS=root: the root filesystem instead of a fresh journaled ext4 (common.sh)
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{native,bind-backing,bind-mnt,backing,mnt,dest,run}
pids=()
labels=()   # what each of pids is, for the memory lines
cleanup() {
  if [ "${GLUSTER:-0}" = 1 ]; then PEERBENCH_BASE=$W/peers "$BENCH/peers.sh" down >/dev/null 2>&1 || true; fi
  for m in "$W/mnt" "$W/mnt-wb" "$W/mnt-var" "$W/mnt-disk" "$W/bind-mnt"; do umount -l "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bench_fs_release "$W"
  rm -rf "$W" /dev/shm/nvmirror-bench-$$-*
}
trap cleanup EXIT


"$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name bench >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name benchwb >/dev/null
"$BIN/fs-dest" serve --root "$W/dest" --listen 127.0.0.1:0 --nvram /dev/shm/nvmirror-bench-$$-dest \
  --tls "$W/tls" >"$W/dest.out" 2>"$W/dest.err" &
pids+=($!)
labels+=("fs-dest (NVRAM /dev/shm)")
bench_wait_line "$W/dest.out" listening
addr=$(sed -n 's/^fs-dest: listening on //p' "$W/dest.out")
"$BIN/fs-source" mount --backing "$W/backing" --mountpoint "$W/mnt" --dest "$addr" --name bench \
  --nvram /dev/shm/nvmirror-bench-$$-source --tls "$W/tls" >"$W/source.out" 2>"$W/source.err" &
pids+=($!)
labels+=("fs-source nvmirror")
bench_wait_line "$W/source.out" mounted
systems=(native="$W/native" bindfs="$W/bind-mnt" nvmirror="$W/mnt")
# WRITEBACK=1: also a source mounted with --writeback-cache (writes return from the page cache;
# fsync and close when mirrored), as the column nvmirror-wb.
if [ "${WRITEBACK:-0}" = 1 ]; then
  mkdir -p "$W/backing-wb" "$W/mnt-wb"
  "$BIN/fs-source" mount --backing "$W/backing-wb" --mountpoint "$W/mnt-wb" --dest "$addr" \
    --name benchwb --nvram /dev/shm/nvmirror-bench-$$-source-wb --tls "$W/tls" --writeback-cache \
    >"$W/source-wb.out" 2>"$W/source-wb.err" &
  pids+=($!)
  labels+=("fs-source nvmirror-wb")
  bench_wait_line "$W/source-wb.out" mounted
  systems+=(nvmirror-wb="$W/mnt-wb")
fi
# VARIANT="LABEL=OPTIONS": one more source on the same destination with extra mount options.
if [ -n "${VARIANT:-}" ]; then
  vlabel=${VARIANT%%=*}
  read -r -a vargs <<<"${VARIANT#*=}"
  mkdir -p "$W/backing-var" "$W/mnt-var"
  "$BIN/fs-dest" certs issue --dir "$W/tls" --name benchvar >/dev/null
  "$BIN/fs-source" mount --backing "$W/backing-var" --mountpoint "$W/mnt-var" --dest "$addr" \
    --name benchvar --nvram /dev/shm/nvmirror-bench-$$-source-var --tls "$W/tls" "${vargs[@]}" \
    >"$W/source-var.out" 2>"$W/source-var.err" &
  pids+=($!)
  labels+=("fs-source $vlabel")
  bench_wait_line "$W/source-var.out" mounted
  systems+=("$vlabel=$W/mnt-var")
fi
# DISK_NVRAM=1: a second destination and source whose NVRAM files are on the disk ($W, the
# same filesystem as the backing volumes and images), as the column nvmirror-disk.
if [ "${DISK_NVRAM:-0}" = 1 ]; then
  mkdir -p "$W"/{dest-disk,backing-disk,mnt-disk,nvram}
  "$BIN/fs-dest" certs issue --dir "$W/tls" --name benchdisk >/dev/null
  "$BIN/fs-dest" serve --root "$W/dest-disk" --listen 127.0.0.1:0 --nvram "$W/nvram/dest" \
    --tls "$W/tls" >"$W/dest-disk.out" 2>"$W/dest-disk.err" &
  pids+=($!)
  labels+=("fs-dest (NVRAM on disk)")
  bench_wait_line "$W/dest-disk.out" listening
  addr_disk=$(sed -n 's/^fs-dest: listening on //p' "$W/dest-disk.out")
  "$BIN/fs-source" mount --backing "$W/backing-disk" --mountpoint "$W/mnt-disk" --dest "$addr_disk" \
    --name benchdisk --nvram "$W/nvram/source" --tls "$W/tls" >"$W/source-disk.out" 2>"$W/source-disk.err" &
  pids+=($!)
  labels+=("fs-source nvmirror-disk")
  bench_wait_line "$W/source-disk.out" mounted
  systems+=(nvmirror-disk="$W/mnt-disk")
fi
if [ "${GLUSTER:-0}" = 1 ]; then
  g=$(PEERBENCH_BASE=$W/peers "$BENCH/peers.sh" up gluster) || { echo "bench: GlusterFS did not come up"; exit 1; }
  systems+=("$g")
fi
bindfs -o big_writes "$W/bind-backing" "$W/bind-mnt" 2>/dev/null || bindfs "$W/bind-backing" "$W/bind-mnt"

raw=${RAW_OUT:-$W/bench.raw}
rm -f "$raw"
PEERBENCH_BASE=$W/pb "$BENCH/peerbench.sh" -r "$ROUNDS" -o "$raw" "${systems[@]}"
echo
python3 "$BENCH/summarize.py" "$raw"
echo
"$BIN/fs-source" status --mountpoint "$W/mnt"
# Peak memory of both daemons over the whole run (VmHWM: the resident set's high-water mark).
peak() { awk '/^VmHWM:/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
echo
for i in "${!pids[@]}"; do
  echo "peak RSS  ${labels[$i]}  $(peak "${pids[$i]}")"
done
