#!/usr/bin/env bash
# fs-source's memory against the number of files it has served (issue 9, docs/benchmarks.md):
# a volume of 10,000, then 100,000, then 1,000,000 files (1,000 per directory, created on the
# backing directory directly), every file stat'ed through the mount, and the daemon's resident
# memory and inode count read from `fs-source status` twice: while the kernel still caches
# every inode, and after it dropped them (drop_caches; the kernel sends FORGET).
#
#   sudo tests/bench/memory.sh                  # 10k 100k 1M, unmirrored mount (no --dest)
#   COUNTS="10000 200000" MIRRORED=1 tests/bench/memory.sh   # mirrored: baseline + fs-dest too
#
# Memory flat across the counts after the drop is the claim; during a walk it follows what the
# kernel references. Release build; NVRAM on /dev/shm; the volume on disk ($TMPDIR or /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
[ "$(id -u)" = 0 ] || { echo "memory.sh: needs root (FUSE mounts, drop_caches)" >&2; exit 1; }
COUNTS=${COUNTS:-10000 100000 1000000}
. tests/bench/common.sh
cargo build --release --bins -q
BIN=$ROOT/target/release
W=$(mktemp -d "${TMPDIR:-/tmp}/nvmirror-memory.XXXXXX")
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{run,backing,mnt,dest}
pids=()
cleanup() {
  umount -l "$W/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" /dev/shm/nvmirror-memory-$$-*
}
trap cleanup EXIT
make_files() { # DIR FROM TO: files FROM..TO-1, 1,000 per directory
  python3 - "$@" <<'PY'
import os, sys
root, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(lo, hi):
    d = os.path.join(root, "d%04d" % (i // 1000))
    if i % 1000 == 0 or i == lo:
        os.makedirs(d, exist_ok=True)
    os.close(os.open(os.path.join(d, "f%04d" % (i % 1000)), os.O_CREAT | os.O_WRONLY, 0o644))
PY
}
walk() { # MNT N: stat every file
  python3 - "$@" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    os.stat(os.path.join(root, "d%04d" % (i // 1000), "f%04d" % (i % 1000)))
PY
}
status() { "$BIN/fs-source" status --json --mountpoint "$W/mnt"; }
mem_line() { # LABEL
  status | python3 -c "
import json, sys
s = json.load(sys.stdin); m = s.get('memory') or {}
print('%-28s fs-source %7.1f MiB resident, %6.1f MiB heap  %8s inodes tracked' % (sys.argv[1], m.get('rss_bytes', 0) / 2**20, m.get('anon_bytes', 0) / 2**20, s.get('inodes')))" "$1"
}

dest_args=()
if [ "${MIRRORED:-0}" = 1 ]; then
  "$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
  "$BIN/fs-dest" certs issue --dir "$W/tls" --name memory >/dev/null
  "$BIN/fs-dest" serve --root "$W/dest" --listen 127.0.0.1:0 --nvram /dev/shm/nvmirror-memory-$$-dest \
    --tls "$W/tls" >"$W/dest.out" 2>"$W/dest.err" &
  pids+=($!)
  bench_wait_line "$W/dest.out" listening
  dest_args=(--dest "$(sed -n 's/^fs-dest: listening on //p' "$W/dest.out")" --tls "$W/tls")
fi
have=0
first=1
echo "files      phase                        memory"
for n in $COUNTS; do
  # The files are added with the volume unmounted (they are data that exists before a mount).
  if [ "$first" = 0 ]; then
    umount "$W/mnt"
    wait "${pids[-1]}" 2>/dev/null || true
  fi
  make_files "$W/backing" "$have" "$n"
  have=$n
  "$BIN/fs-source" mount --backing "$W/backing" --mountpoint "$W/mnt" --name memory \
    --nvram /dev/shm/nvmirror-memory-$$-source "${dest_args[@]}" >"$W/source.out" 2>"$W/source.err" &
  pids+=($!)
  bench_wait_line "$W/source.out" mounted 600
  if [ "${MIRRORED:-0}" = 1 ]; then
    timeout 3600 "$BIN/fs-source" wait --mountpoint "$W/mnt" --timeout 3600 >/dev/null 2>&1 || true
  fi
  first=0
  t0=$EPOCHREALTIME
  walk "$W/mnt" "$n"
  t1=$EPOCHREALTIME
  mem_line "$(printf '%8d  after stat of all (%.0f/s)' "$n" "$(python3 -c "print($n/($t1-$t0))")")"
  # FORGETs arrive asynchronously: drop and read again until the table is down to a few
  # inodes (at most 10 s).
  for _ in $(seq 50); do
    echo 2 > /proc/sys/vm/drop_caches
    [ "$(status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("inodes") or 0)')" -le 10 ] && break
    sleep 0.2
  done
  mem_line "$(printf '%8d  after drop_caches' "$n")"
done
awk '/^VmHWM:/ {printf "peak RSS  fs-source (last mount) %.1f MiB\n", $2/1024}' "/proc/${pids[-1]}/status"
