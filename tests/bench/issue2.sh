#!/usr/bin/env bash
# The two figures issue 2 asks for, measured in one run: a 1 GiB sequential write (1 MiB
# blocks, fsync at the end) and creating 10,000 small files (4 KiB each, 100 directories),
# through a mirrored mount (release build, loopback, NVRAM on /dev/shm) and on the bare backing
# directory's filesystem, alternating so both see the same machine load.
#   sudo tests/bench/issue2.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
cargo build --release --bins -q
BIN=$PWD/target/release
W=$(mktemp -d /tmp/nvmirror-issue2.XXXXXX)
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{bare,backing,mnt,dest,run}
pids=()
cleanup() {
  umount -l "$W/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" /dev/shm/nvmirror-issue2-$$-*
}
trap cleanup EXIT
wait_line() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; cat "$1"; exit 1; }
"$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name bench >/dev/null
"$BIN/fs-dest" serve --root "$W/dest" --listen 127.0.0.1:0 --nvram /dev/shm/nvmirror-issue2-$$-d \
  --tls "$W/tls" >"$W/d.out" 2>"$W/d.err" &
pids+=($!)
wait_line "$W/d.out" listening
addr=$(sed -n 's/^fs-dest: listening on //p' "$W/d.out")
"$BIN/fs-source" mount --backing "$W/backing" --mountpoint "$W/mnt" --dest "$addr" --name bench \
  --nvram /dev/shm/nvmirror-issue2-$$-s --tls "$W/tls" >"$W/s.out" 2>"$W/s.err" &
pids+=($!)
wait_line "$W/s.out" mounted

seq1g() { # DIR -> seconds
  local t0 t1; sync; t0=$(date +%s.%N)
  dd if=/dev/zero of="$1/big" bs=1M count=1024 conv=fsync status=none
  t1=$(date +%s.%N); rm -f "$1/big"; echo "$t1 - $t0" | bc
}
files10k() { # DIR -> seconds
  python3 - "$1" <<'PY'
import os, sys, time
root = os.path.join(sys.argv[1], "small"); buf = os.urandom(4096)
os.mkdir(root); t0 = time.perf_counter()
for d in range(100):
    dd = os.path.join(root, "d%03d" % d); os.mkdir(dd)
    for f in range(100):
        fd = os.open(os.path.join(dd, "f%03d" % f), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, buf); os.close(fd)
print(f"{time.perf_counter() - t0:.3f}")
PY
  rm -rf "$1/small"
}
for r in $(seq "$ROUNDS"); do
  echo "round $r: 1GiB seq write  bare $(seq1g "$W/bare") s   mirrored $(seq1g "$W/mnt") s"
  echo "round $r: 10k small files bare $(files10k "$W/bare") s   mirrored $(files10k "$W/mnt") s"
done
"$BIN/fs-source" cp --mountpoint "$W/mnt"
"$BIN/fs-source" status --mountpoint "$W/mnt"
