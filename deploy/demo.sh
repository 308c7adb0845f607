#!/usr/bin/env bash
# nvmirror in one minute, on one machine: a destination and a source on loopback.
#
#   sudo deploy/demo.sh            # debug build (fast to build)
#   sudo deploy/demo.sh --release  # optimised build
#
# It installs what it needs if missing (Debian: a C compiler for the crypto crate, fuse3),
# builds the two daemons, creates certificates in a temp dir, starts fs-dest on
# 127.0.0.1 (a free port), mounts fs-source on a temp mount point, writes a few files through
# the mount, runs a consistency point, shows the mirrored image and both statuses, checks that
# the image equals the backing volume, and cleans everything up (also on error or Ctrl-C).
# Needs root (FUSE mount). KEEP=1 keeps the temp dir for a look afterwards.
set -euo pipefail

profile=debug
cargo_flags=()
case "${1:-}" in
  --release) profile=release; cargo_flags=(--release) ;;
  "") ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts need it): sudo $0"
[ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse)"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run again"

# --- what the build and the mount need -------------------------------------------------------
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

say "building fs-source and fs-dest ($profile)"
cargo build "${cargo_flags[@]}" --bins -p fs-source -p fs-dest
target_dir=${CARGO_TARGET_DIR:-$top/target}
fs_source=$target_dir/$profile/fs-source
fs_dest=$target_dir/$profile/fs-dest

# --- a scratch world, removed on exit ---------------------------------------------------------
work=$(mktemp -d /tmp/nvmirror-demo.XXXXXX)
chmod 755 "$work"
export NVMIRROR_RUN_DIR=$work/run
mkdir -p "$NVMIRROR_RUN_DIR" "$work/backing" "$work/mnt" "$work/dest-root"
source_pid=""
dest_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$source_pid" ] && kill -0 "$source_pid" 2>/dev/null; then
    kill -TERM "$source_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$source_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$source_pid" 2>/dev/null || true
  fi
  if grep -q " $work/mnt " /proc/mounts 2>/dev/null; then
    umount -l "$work/mnt" || true
  fi
  if [ -n "$dest_pid" ] && kill -0 "$dest_pid" 2>/dev/null; then
    kill -TERM "$dest_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$dest_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$dest_pid" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    echo "demo FAILED (exit $rc); daemon logs:" >&2
    for log in "$work"/*.log; do [ -f "$log" ] && { echo "--- $log" >&2; tail -n 40 "$log" >&2; }; done
  fi
  if [ "${KEEP:-}" = 1 ] || grep -q " $work/" /proc/mounts 2>/dev/null; then
    echo "kept $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until FILE has a line starting with PREFIX (prints the rest), while PID lives.
wait_for_line() {
  local file=$1 prefix=$2 pid=$3
  for _ in $(seq 1 600); do
    if line=$(grep -m1 "^$prefix" "$file" 2>/dev/null); then
      echo "${line#"$prefix"}"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || die "process $pid exited before printing '$prefix'"
    sleep 0.1
  done
  die "no '$prefix' from process $pid within 60 s"
}

say "certificates: a CA, the destination's certificate, one for source 'demo'"
"$fs_dest" certs init --dir "$work/tls"
"$fs_dest" certs issue --dir "$work/tls" --name demo
ls "$work/tls"

say "starting fs-dest"
"$fs_dest" serve --root "$work/dest-root" --listen 127.0.0.1:0 \
  --nvram "$work/dest.nvram" --tls "$work/tls" >"$work/fs-dest.out" 2>"$work/fs-dest.log" &
dest_pid=$!
addr=$(wait_for_line "$work/fs-dest.out" "fs-dest: listening on " "$dest_pid")
echo "fs-dest listening on $addr"

say "mounting fs-source on $work/mnt"
"$fs_source" mount --backing "$work/backing" --mountpoint "$work/mnt" --dest "$addr" \
  --name demo --nvram "$work/source.nvram" --tls "$work/tls" \
  >"$work/fs-source.out" 2>"$work/fs-source.log" &
source_pid=$!
wait_for_line "$work/fs-source.out" "fs-source: mounted" "$source_pid" >/dev/null
grep " $work/mnt " /proc/mounts

say "writing through the mount"
mkdir -p "$work/mnt/projects/nvmirror"
echo "Every change here is in NVRAM on two machines before you get your prompt back." \
  >"$work/mnt/hello.txt"
printf 'line %s\n' $(seq 1 1000) >"$work/mnt/projects/nvmirror/numbers.txt"
ln -s ../hello.txt "$work/mnt/projects/hello-link"
chmod 600 "$work/mnt/projects/nvmirror/numbers.txt"
ls -lR "$work/mnt"

say "fs-source cp (consistency point: the destination applies its journal to the image)"
"$fs_source" cp --mountpoint "$work/mnt"

image=$work/dest-root/demo/image
say "the mirrored image: $image"
ls -lR "$image"
echo "--- hello.txt in the image:"
cat "$image/hello.txt"

say "fs-source status"
"$fs_source" status --mountpoint "$work/mnt"
say "fs-dest status"
"$fs_dest" status --root "$work/dest-root"

say "checking: image == backing volume"
diff -r --no-dereference "$work/backing" "$image"
echo "identical"

say "stopping (fs-source unmounts on SIGTERM)"
kill -TERM "$source_pid"
for _ in $(seq 1 300); do kill -0 "$source_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$source_pid" 2>/dev/null; then die "fs-source did not exit within 30 s of SIGTERM"; fi
wait "$source_pid" || die "fs-source exited with status $? after SIGTERM"
source_pid=""
if grep -q " $work/mnt " /proc/mounts; then die "fs-source exited but left $work/mnt mounted"; fi
echo "demo finished: OK"
