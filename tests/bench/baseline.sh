#!/usr/bin/env bash
# Issue 7's figures, measured in one run on this machine (release build, loopback, NVRAM on
# /dev/shm):
#
#   * baseline of a tree of SIZE_MIB MiB in FILES files (default 1 GiB, 20,000 files in 200
#     directories) next to `rsync -a` of the same tree into an empty directory (page cache
#     dropped before each, so both read from disk);
#   * `fs-source verify` of the mirrored tree (cold cache): entries, bytes and MiB/s.
#
#   sudo tests/bench/baseline.sh            # FILES=20000 SIZE_MIB=1024
#   FILES=2000 SIZE_MIB=100 tests/bench/baseline.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
FILES=${FILES:-20000}
SIZE_MIB=${SIZE_MIB:-1024}
command -v rsync >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null
cargo build --release --bins -q
BIN=$PWD/target/release
W=$(mktemp -d /tmp/nvmirror-baseline.XXXXXX)
export NVMIRROR_RUN_DIR=$W/run
mkdir -p "$W"/{tree,rsync-copy,mnt,dest,run}
pids=()
cleanup() {
  umount -l "$W/mnt" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" /dev/shm/nvmirror-baseline-$$-*
}
trap cleanup EXIT
wait_line() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; cat "$1"; exit 1; }
now() { date +%s.%N; }
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "baseline bench: making a tree of $FILES files, $SIZE_MIB MiB"
python3 - "$W/tree" "$FILES" "$SIZE_MIB" <<'EOF'
import os, random, sys
root, files, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
rng = random.Random(7)
# Sizes: mostly small, a few large, summing to `size`.
weights = [rng.paretovariate(1.2) for _ in range(files)]
scale = size / sum(weights)
block = os.urandom(1 << 20)
for i, w in enumerate(weights):
    d = os.path.join(root, f"d{i % 200:03d}")
    os.makedirs(d, exist_ok=True)
    n = int(w * scale)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        while n > 0:
            k = min(n, len(block))
            f.write(block[rng.randrange(0, len(block) - k + 1):][:k])
            n -= k
EOF
du -sh "$W/tree"

cold
t0=$(now)
rsync -a "$W/tree/" "$W/rsync-copy/"
t1=$(now)
rsync_s=$(echo "$t1 - $t0" | bc)
sync
t2=$(now)
rsync_sync_s=$(echo "$t2 - $t0" | bc)
rm -rf "$W/rsync-copy"

"$BIN/fs-dest" certs init --dir "$W/tls" >/dev/null
"$BIN/fs-dest" certs issue --dir "$W/tls" --name bench >/dev/null
"$BIN/fs-dest" serve --root "$W/dest" --listen 127.0.0.1:0 --nvram /dev/shm/nvmirror-baseline-$$-d \
  --tls "$W/tls" >"$W/d.out" 2>"$W/d.err" &
pids+=($!)
wait_line "$W/d.out" listening
addr=$(sed -n 's/^fs-dest: listening on //p' "$W/d.out")
cold
t0=$(now)
"$BIN/fs-source" mount --backing "$W/tree" --mountpoint "$W/mnt" --dest "$addr" --name bench \
  --nvram /dev/shm/nvmirror-baseline-$$-s --tls "$W/tls" >"$W/s.out" 2>"$W/s.err" &
pids+=($!)
wait_line "$W/s.out" mounted
for _ in $(seq 36000); do
  state=$("$BIN/fs-source" status --json --mountpoint "$W/mnt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["baseline"]["state"])')
  [ "$state" = done ] && break
  sleep 0.1
done
t1=$(now)
[ "$state" = done ] || { echo "baseline did not finish"; tail -20 "$W/s.err"; exit 1; }
grep -E "baseline: (every entry|transferring)|baseline complete" "$W/s.err" | sed 's/^/  source log: /' || true
nv_s=$(echo "$t1 - $t0" | bc)

cold
verify_out=$("$BIN/fs-source" verify --json --mountpoint "$W/mnt")
read -r v_entries v_bytes v_secs v_diff < <(echo "$verify_out" | python3 -c '
import json,sys; r=json.load(sys.stdin)
print(r["entries"], r["bytes"], r["seconds"], len(r["differences"]))')

printf '\n%-34s %10s\n' "what ($FILES files, $SIZE_MIB MiB)" "seconds"
printf '%-34s %10.2f\n' "rsync -a into an empty directory" "$rsync_s"
printf '%-34s %10.2f\n' "rsync -a, then sync (durable)" "$rsync_sync_s"
printf '%-34s %10.2f   (%.2fx rsync)\n' "nvmirror baseline (mount to done)" "$nv_s" "$(echo "$nv_s / $rsync_s" | bc -l)"
printf '%-34s %10.2f   (%s entries, %.0f MiB/s, %s differences)\n' "fs-source verify (cold cache)" "$v_secs" \
  "$v_entries" "$(echo "$v_bytes / 1048576 / $v_secs" | bc -l)" "$v_diff"
