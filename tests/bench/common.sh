# Shared by the benchmark scripts (source it): waiting for a daemon's ready line and installing
# the packages a script needs.

# bench_wait_line FILE PATTERN [SECONDS]: wait (default 30 s) until FILE holds PATTERN; else
# print FILE and exit 1.
bench_wait_line() {
  local i
  for ((i = 0; i < ${3:-30} * 10; i++)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "bench: timed out waiting for '$2' in $1"; cat "$1"; exit 1
}

# bench_need COMMAND=PACKAGE...: apt-get install the packages whose command is missing.
bench_need() {
  local spec missing=()
  for spec in "$@"; do
    command -v "${spec%%=*}" >/dev/null || missing+=("${spec#*=}")
  done
  [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# bench_fs DIR: unless BENCH_FS=root, mount a fresh ext4 with a journal on DIR (empty), on a
# loop device with direct I/O over a sparse file in /var/tmp, so that every system measured
# (the plain directory, bindfs's backing, nvmirror's backing volume, images and disk NVRAM,
# GlusterFS's bricks) works on the same kind of filesystem a deployment would. This machine's
# root filesystem is ext4 without a journal: an fsync there costs less than on any crash-safe
# filesystem, and a create after many deletes scans the recently deleted inodes of its block
# group (ext4's `recently_deleted`, only without a journal), so create rates fall with every
# round (docs/benchmarks.md, "The benchmarks' filesystem"). BENCH_FS_SIZE sets its size [16G].
# bench_fs_release DIR undoes it (call it from the cleanup trap, after the daemons are gone).
bench_fs() {
  local dir=$1 img dev
  case "${BENCH_FS:-ext4}" in
  root) return 0 ;;
  ext4) ;;
  *) echo "bench: BENCH_FS must be ext4 or root, not ${BENCH_FS}"; exit 1 ;;
  esac
  bench_need mkfs.ext4=e2fsprogs losetup=mount
  img=/var/tmp/$(basename "$dir").img
  truncate -s "${BENCH_FS_SIZE:-16G}" "$img"
  # Inode tables and journal written now, not by a background thread during the rounds.
  mkfs.ext4 -q -F -i 65536 -E lazy_itable_init=0,lazy_journal_init=0 "$img"
  dev=$(losetup --find --show --direct-io=on "$img")
  mount "$dev" "$dir"
  echo "bench: systems on a fresh ext4 (journal) on $dev over $img; BENCH_FS=root for the root filesystem" >&2
}

bench_fs_release() {
  local dir=$1 dev img
  [ "${BENCH_FS:-ext4}" = ext4 ] || return 0
  img=/var/tmp/$(basename "$dir").img
  dev=$(findmnt -n -o SOURCE --target "$dir" 2>/dev/null || true)
  if mountpoint -q "$dir"; then umount "$dir" 2>/dev/null || umount -l "$dir"; fi
  [ -n "$dev" ] && [ "${dev#/dev/loop}" != "$dev" ] && losetup -d "$dev" 2>/dev/null
  rm -f "$img"
}
