#!/usr/bin/env bash
# The runbook (docs/operations.md), walked end to end on one machine with two "hosts":
# two network namespaces joined by a veth pair, the destination at 10.77.0.1 and the source at
# 10.77.0.2. Every step prints a numbered heading, the commands it runs and their output, and
# checks what the runbook promises (equal trees, statuses, error messages); the first promise
# that does not hold stops the script with a message naming the step.
#
#   sudo deploy/two-hosts.sh                    # binaries from target/debug (build them first:
#                                               #   cargo build --workspace --bins)
#   sudo BIN_DIR=target/release deploy/two-hosts.sh
#   sudo KEEP=1 deploy/two-hosts.sh             # keep the work dir (daemon logs) afterwards
#
# Steps: two hosts; certificates; the destination; the source mounted (policy strict); a
# workload and a consistency point; link cut under policy strict; the source remounted with
# policy sync; link cut under policy sync; source loss (SIGKILL); promote; the promoted image
# served as a primary; the old source comes back and is fenced; failback (reseed, demote, mount
# at the new generation); stop.
#
# Needs root, /dev/fuse, `ip` (iproute2) and `nsenter` (util-linux). The destination runs under
# `ip netns exec`; the source's mounts run under `nsenter --net=` instead, because `ip netns exec`
# also enters a private mount namespace and a FUSE mount made there would be invisible to the
# rest of the machine (and to this script). Namespace and interface names carry this script's
# PID, so runs in parallel do not clash. tests/tests/runbook.rs runs this script.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${BIN_DIR:-$top/target/debug}
case "$BIN_DIR" in /*) ;; *) BIN_DIR=$top/$BIN_DIR ;; esac

STEP="0. preconditions"
fail() {
  echo "two-hosts.sh: FAILED at step ${STEP}: $*" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || fail "run as root (network namespaces, FUSE mounts)"
[ -e /dev/fuse ] || fail "/dev/fuse is missing (modprobe fuse)"
for tool in ip nsenter timeout diff sha256sum find; do
  command -v "$tool" >/dev/null || fail "\`$tool\` is missing (apt-get install iproute2 util-linux diffutils)"
done
for b in fs-source fs-dest; do
  [ -x "$BIN_DIR/$b" ] || fail "$BIN_DIR/$b not found: build it first (cargo build --workspace --bins) or set BIN_DIR"
done
# The commands below read as in the runbook: `fs-dest ...`, `fs-source ...`.
export PATH="$BIN_DIR:$PATH"

# --- the two hosts' names, the work dir ---------------------------------------------------------
tag=$$
DNS=nvrbD$tag            # the destination host's namespace
SNS=nvrbS$tag            # the source host's namespace
DIF=nvrbd$tag            # veth end on the destination (at most 15 characters)
SIF=nvrbs$tag            # veth end on the source
DEST_IP=10.77.0.1
SOURCE_IP=10.77.0.2
PORT=7447
NAME=alpha
TIMEOUT_MS=2000          # --timeout-ms of the source: short, so that the link cuts are quick
PARTITION=1048576        # --partition-size of the source: small, so that a link cut fills the
                         # NVRAM and the records spill to NAME.nvram.backlog

W=$(mktemp -d "${TMPDIR:-/tmp}/nvmirror-two-hosts.XXXXXX")
chmod 755 "$W"
# The destination host's files ...
D_TLS=$W/dest/etc/nvmirror/tls
ROOT=$W/dest/var/lib/nvmirror
D_NVRAM=$ROOT/dest.nvram
P_MNT=$W/dest/mnt/$NAME                                   # the promoted volume's mount point
P_NVRAM=$ROOT/$NAME-promoted.nvram
# ... and the source host's.
S_TLS=$W/source/etc/nvmirror/tls
BACKING=$W/source/srv/$NAME
MNT=$W/source/mnt/$NAME
S_NVRAM=$W/source/var/lib/nvmirror/$NAME.nvram
LOGS=$W/logs
IMAGE=$ROOT/$NAME/image
export NVMIRROR_RUN_DIR=$W/run                            # control sockets of this run only
mkdir -p "$D_TLS" "$ROOT" "$P_MNT" "$S_TLS" "$BACKING" "$MNT" \
  "$(dirname "$S_NVRAM")" "$LOGS" "$NVMIRROR_RUN_DIR"

dest_pid=""
source_pid=""
promoted_pid=""
netns_made=0

# --- cleanup, on every exit ---------------------------------------------------------------------
stop_pid() { # PID: SIGCONT, SIGTERM, up to 15 s, SIGKILL
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? m
  trap - EXIT INT TERM
  set +e
  stop_pid "$source_pid"
  stop_pid "$promoted_pid"
  stop_pid "$dest_pid"
  wait 2>/dev/null
  for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m"
  done
  if [ "$netns_made" = 1 ]; then
    ip netns del "$SNS" 2>/dev/null
    ip netns del "$DNS" 2>/dev/null
  fi
  if [ "$rc" != 0 ]; then
    echo "two-hosts.sh: FAILED (exit $rc) in step ${STEP}; daemon logs (last lines):" >&2
    for log in "$LOGS"/*; do
      [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }
    done
  fi
  if [ "${KEEP:-}" = 1 ] || awk -v w="$W/" 'index($2, w) == 1 {f=1} END {exit !f}' /proc/mounts; then
    echo "two-hosts.sh: kept $W"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------------------------
step() { # "N. title"
  STEP=$1
  printf '\n== %s ==\n' "$1"
}
show() { # print a local command
  printf '$ %s\n' "$*"
}
show_on() { # HOST CMD...: print a command run on HOST
  local host=$1
  shift
  printf '[%s] $ %s\n' "$host" "$*"
}
run_sh() { # print and run a line of shell code (bounded: 60 s)
  show "$1"
  timeout 60 sh -c "$1" || fail "\`$1\` exited with status $?"
}
run() { # print and run a local command (bounded: 60 s); its failure is the step's failure
  show "$@"
  timeout 60 "$@" || fail "\`$*\` exited with status $?"
}
# How a command runs on a host: on the destination with `ip netns exec`, except FUSE mounts
# (`ip netns exec` gives its command a private mount namespace, which would hide the mount from
# everyone else); on the source host with `nsenter --net=` (it mounts).
prefix_of() { # HOST -> PFX
  case $1 in
    dest) PFX=(ip netns exec "$DNS") ;;
    dest-fuse) PFX=(nsenter "--net=/run/netns/$DNS" --) ;;
    source) PFX=(nsenter "--net=/run/netns/$SNS" --) ;;
    *) fail "unknown host $1" ;;
  esac
}
on() { # HOST CMD...: print "[HOST] $ CMD" and run it there (bounded: 60 s); failure fails the step
  local host=$1 rc=0
  shift
  prefix_of "$host"
  printf '[%s] $ %s\n' "${host%-fuse}" "$*"
  timeout 60 "${PFX[@]}" "$@" || rc=$?
  [ "$rc" = 0 ] || fail "\`$*\` (on the $host host) exited with status $rc"
}
q() { # HOST CMD...: run quietly there (bounded: 60 s), for polling and captured output
  local host=$1
  shift
  prefix_of "$host"
  timeout 60 "${PFX[@]}" "$@"
}
# wait_for CONDITION TIMEOUT_S: polls the shell condition (every 0.1 s) until it holds; fails the
# step naming the condition when TIMEOUT_S seconds pass first.
wait_for() {
  local cond=$1 timeout=$2 start=$SECONDS
  while ! eval "$cond" >/dev/null 2>&1; do
    if (( SECONDS - start >= timeout )); then
      fail "timed out after ${timeout} s waiting for: $cond"
    fi
    sleep 0.1
  done
  echo "(waited $(( SECONDS - start )) s for: $cond)"
}

# start_daemon LOG_NAME READY_PREFIX PIDVAR HOST CMD...: starts CMD on HOST in the background
# (stdout to LOG_NAME.out, stderr to LOG_NAME.log; PIDVAR = its pid) and waits until it prints a
# line starting with READY_PREFIX; fails if it exits first or stays silent for 60 s.
start_daemon() {
  local log=$1 ready=$2 pidvar=$3 host=$4 pid rc=0
  shift 4
  prefix_of "$host"
  printf '[%s] $ %s &\n' "${host%-fuse}" "$*"
  "${PFX[@]}" "$@" >"$LOGS/$log.out" 2>"$LOGS/$log.log" &
  pid=$!
  printf -v "$pidvar" %s "$pid"
  wait_for "grep -q '^$ready' '$LOGS/$log.out' || ! kill -0 $pid" 60 >/dev/null
  if ! grep -q "^$ready" "$LOGS/$log.out"; then
    wait "$pid" 2>/dev/null || rc=$?
    printf -v "$pidvar" %s ""
    cat "$LOGS/$log.out" "$LOGS/$log.log" >&2
    fail "\`$*\` exited with status $rc before printing '$ready'"
  fi
  grep "^$ready" "$LOGS/$log.out"
}

# One scalar field of a one-line JSON object: json_field KEY < JSON (first occurrence).
json_field() {
  grep -o "\"$1\":[^,}]*" | head -n1 | cut -d: -f2- | tr -d '"'
}
src_json() { q "${2:-source}" fs-source status --json --mountpoint "${1:-$MNT}"; } # [MNT [HOST]]
src_field() { src_json "${2:-$MNT}" "${3:-source}" | json_field "$1"; }             # KEY [MNT [HOST]]
dest_json() { q dest fs-dest status --json --root "$ROOT"; }
dest_field() { dest_json | json_field "$1"; }

# listing DIR: what the trees must agree on: type, mode, owner, size, link count, symlink target
# and a SHA-256 of every regular file (not times: a CP applies records after the source ran them).
listing() {
  (
    cd "$1"
    find . -mindepth 1 \( -type f -printf 'f %m %U:%G %s %n %p\n' \) \
      -o \( -type l -printf 'l %U:%G %p -> %l\n' \) \
      -o \( -type d -printf 'd %m %U:%G %p\n' \) \
      -o -printf '%y %m %U:%G %n %p\n' | LC_ALL=C sort
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
  )
}
# same_tree A B WHAT: A and B are equal (diff -r and the listing above), else the step fails.
same_tree() {
  show "diff -r --no-dereference $1 $2"
  diff -r --no-dereference "$1" "$2" || fail "$3: diff -r found differences between $1 and $2"
  if ! diff <(listing "$1") <(listing "$2") >"$W/listing.diff"; then
    cat "$W/listing.diff"
    fail "$3: the trees differ in type, mode, owner, size, link count or content"
  fi
  echo "equal: $(listing "$1" | grep -c '^[a-z] ') entries ($3)"
}
# expect_eio FILE: writing FILE through the mount fails with EIO (bounded).
expect_eio() {
  show "echo data > $1     # must fail with EIO"
  local err
  if err=$(timeout 60 sh -c 'echo data > "$1"' sh "$1" 2>&1); then
    fail "writing $1 succeeded; the runbook promises EIO"
  fi
  echo "$err"
  case "$err" in *"Input/output error"*) ;; *) fail "writing $1 failed, but not with EIO: $err" ;; esac
}
# The workload: a small tree through mount point $1, with tag $2 (names differ per call).
workload() {
  local m=$1 t=$2
  show "workload in $m: dirs, files (1 B .. 1 MiB), overwrite, truncate, rename, chmod, chown, hard link, symlink, unlink"
  mkdir -p "$m/$t/docs/deep/er" "$m/$t/bin"
  for i in 1 2 3 4 5 6 7 8; do
    head -c $(( i * i * 16384 )) /dev/urandom >"$m/$t/docs/f$i"
  done
  echo "hello from $t" >"$m/$t/hello.txt"
  head -c 1048576 /dev/urandom >"$m/$t/bin/blob"
  printf 'overwritten' | dd of="$m/$t/docs/f3" bs=1 seek=100 conv=notrunc status=none
  truncate -s 5000 "$m/$t/docs/f4"
  truncate -s 300000 "$m/$t/docs/f2"
  mv "$m/$t/docs/f5" "$m/$t/docs/deep/er/f5-renamed"
  chmod 0600 "$m/$t/docs/f6"
  chmod 4755 "$m/$t/bin/blob"
  chown 65534:65534 "$m/$t/docs/f7"
  ln "$m/$t/docs/f1" "$m/$t/docs/f1.link"
  ln -s ../hello.txt "$m/$t/docs/hello-link"
  rm "$m/$t/docs/f8"
  find "$m/$t" | wc -l | sed 's/^/entries written: /'
}

# ==================================================================================================
step "1. two hosts: network namespaces and a veth link"
netns_made=1
run ip netns add "$DNS"
run ip netns add "$SNS"
run ip link add "$DIF" netns "$DNS" type veth peer name "$SIF" netns "$SNS"
run ip -n "$DNS" addr add "$DEST_IP/24" dev "$DIF"
run ip -n "$SNS" addr add "$SOURCE_IP/24" dev "$SIF"
for ns_if in "$DNS $DIF" "$SNS $SIF"; do
  set -- $ns_if
  run ip -n "$1" link set "$2" up
  run ip -n "$1" link set lo up
done
echo "destination host: namespace $DNS ($DEST_IP), source host: namespace $SNS ($SOURCE_IP)"
echo "work dir: $W"

# ==================================================================================================
step "2. certificates"
on dest fs-dest certs init --dir "$D_TLS" --san "$DEST_IP"
on dest fs-dest certs issue --dir "$D_TLS" --name "$NAME"
run ls "$D_TLS"
# Only these three go to the source host; ca.key stays on the destination.
run cp "$D_TLS/ca.pem" "$D_TLS/$NAME.pem" "$D_TLS/$NAME.key" "$S_TLS/"
run ls "$S_TLS"
[ ! -e "$S_TLS/ca.key" ] || fail "ca.key must stay on the destination"

# ==================================================================================================
step "3. the destination: fs-dest serve"
start_daemon fs-dest "fs-dest: listening on" dest_pid \
  dest fs-dest serve --root "$ROOT" --listen "0.0.0.0:$PORT" --nvram "$D_NVRAM" --tls "$D_TLS"
on dest fs-dest status --root "$ROOT"

# ==================================================================================================
step "4. the source: fs-source mount, policy strict"
start_daemon fs-source-1 "fs-source: mounted" source_pid \
  source fs-source mount --backing "$BACKING" --mountpoint "$MNT" --dest "$DEST_IP:$PORT" \
  --name "$NAME" --nvram "$S_NVRAM" --tls "$S_TLS" --policy strict --timeout-ms "$TIMEOUT_MS" \
  --partition-size "$PARTITION"
run_sh "grep ' $MNT ' /proc/mounts"
on source fs-source status --mountpoint "$MNT"
[ "$(src_field link)" = up ] || fail "fs-source status: link is not up"

# ==================================================================================================
step "5. workload, consistency point, statuses"
workload "$MNT" w1
on source fs-source cp --mountpoint "$MNT"
on source fs-source status --mountpoint "$MNT"
on dest fs-dest status --root "$ROOT"
s=$(src_json)
logged=$(json_field last_logged_seq <<<"$s")
acked=$(json_field last_acked_seq <<<"$s")
applied=$(json_field last_applied_seq <<<"$s")
[ "$logged" = "$acked" ] && [ "$acked" = "$applied" ] ||
  fail "after cp: logged $logged, acknowledged $acked, applied $applied differ"
[ "$(json_field lag_records <<<"$s")" = 0 ] || fail "after cp: lag_records is not 0: $s"
d_applied=$(dest_field applied_seq)
[ "$d_applied" = "$applied" ] ||
  fail "fs-dest status applied_seq $d_applied, fs-source status last_applied_seq $applied"
[ "$(dest_field connected)" = true ] || fail "fs-dest status: $NAME is not connected"
echo "source and destination agree: applied up to record $applied"
same_tree "$BACKING" "$IMAGE" "image = backing after cp"
on source fs-source verify --mountpoint "$MNT"

# ==================================================================================================
step "6. link cut, policy strict"
run ip -n "$SNS" link set "$SIF" down
# In flight when the link dies: logged and applied on the source, EIO after --timeout-ms.
expect_eio "$MNT/in-flight"
wait_for '[ "$(src_field link)" = down ]' 15
on source fs-source status --mountpoint "$MNT"
# With the link known down: refused before anything of it is logged; nothing is created.
expect_eio "$MNT/during"
[ ! -e "$BACKING/during" ] || fail "a write refused under strict left $BACKING/during behind"
echo "no $BACKING/during: refused before it was logged"
show "cat $MNT/w1/hello.txt     # reads keep working"
cat "$MNT/w1/hello.txt" || fail "a read failed with the link down"
run ip -n "$SNS" link set "$SIF" up
wait_for '[ "$(src_field link)" = up ]' 30
run_sh "echo after > $MNT/after-strict"
on source fs-source cp --mountpoint "$MNT"
on source fs-source status --mountpoint "$MNT"
[ "$(src_field lag_records)" = 0 ] || fail "lag_records is not 0 after the link returned"
[ "$(dest_field applied_seq)" = "$(src_field last_applied_seq)" ] ||
  fail "fs-dest status and fs-source status disagree on the applied sequence"
same_tree "$BACKING" "$IMAGE" "image = backing after the link returned"
[ ! -e "$IMAGE/during" ] || fail "the refused create reached the image"
if [ -e "$BACKING/in-flight" ]; then
  [ -e "$IMAGE/in-flight" ] || fail "the in-flight create did not reach the image when the link returned"
  echo "the in-flight create (EIO, but logged) reached the image; the refused one did not"
else
  echo "the first create was refused before it was logged (the link was already known down)"
fi

# ==================================================================================================
step "7. the source remounted with policy sync"
show "kill -TERM $source_pid     # fs-source unmounts and exits 0"
kill -TERM "$source_pid"
wait_for "! kill -0 $source_pid" 30
wait "$source_pid" || fail "fs-source exited with status $? after SIGTERM"
source_pid=""
! grep -q " $MNT " /proc/mounts || fail "fs-source exited but left $MNT mounted"
start_daemon fs-source-2 "fs-source: mounted" source_pid \
  source fs-source mount --backing "$BACKING" --mountpoint "$MNT" --dest "$DEST_IP:$PORT" \
  --name "$NAME" --nvram "$S_NVRAM" --tls "$S_TLS" --policy sync --timeout-ms "$TIMEOUT_MS" \
  --partition-size "$PARTITION"
wait_for '[ "$(src_field link)" = up ]' 30
on source fs-source status --mountpoint "$MNT"

# ==================================================================================================
step "8. link cut, policy sync"
run ip -n "$SNS" link set "$SIF" down
# The first write waits --timeout-ms, then the source goes on alone.
run_sh "echo during > $MNT/during-sync"
workload "$MNT" alone
on source fs-source status --mountpoint "$MNT"
[ "$(src_field degraded)" = true ] || fail "fs-source status: not degraded while the link is down"
lag=$(src_field lag_records)
(( lag > 0 )) || fail "fs-source status: lag_records $lag while writing alone"
backlog=$(src_field backlog_records)
(( backlog > 0 )) || fail "fs-source status: backlog_records $backlog although the partitions are full"
run ls -l "$S_NVRAM.backlog"
echo "degraded, lag_records $lag, backlog_records $backlog"
run ip -n "$SNS" link set "$SIF" up
wait_for 's=$(src_json) && [ "$(json_field link <<<"$s")" = up ] &&
  [ "$(json_field degraded <<<"$s")" = false ] && [ "$(json_field lag_records <<<"$s")" = 0 ] &&
  [ "$(json_field last_acked_seq <<<"$s")" = "$(json_field last_logged_seq <<<"$s")" ] &&
  [ "$(json_field backlog_records <<<"$s")" = 0 ]' 60
on source fs-source status --mountpoint "$MNT"
on source fs-source cp --mountpoint "$MNT"
on dest fs-dest status --root "$ROOT"
same_tree "$BACKING" "$IMAGE" "image = backing after the backlog drained"

# ==================================================================================================
step "9. source loss: fs-source killed (SIGKILL)"
# Acknowledged writes after the last CP: they are in the destination's NVRAM and journals only.
workload "$MNT" late
run_sh "echo 'overwritten after the last CP' > $MNT/w1/hello.txt"
run mv "$MNT/w1/docs" "$MNT/w1/docs-renamed"
run rm "$MNT/alone/hello.txt"
# Every write above was acknowledged (sync, not degraded): the backing directory as it is now is
# exactly what the destination must give back.
[ "$(src_field degraded)" = false ] || fail "the source went degraded during the late writes"
# A live source is not promoted by mistake.
show_on dest "fs-dest promote --root $ROOT --source $NAME     # refused: the source is connected"
rc=0
out=$(q dest fs-dest promote --root "$ROOT" --source "$NAME" 2>&1) || rc=$?
echo "$out"
[ "$rc" != 0 ] || fail "fs-dest promote of a connected source succeeded"
grep -q "is connected and mirroring: promoting now would fence a live source" <<<"$out" ||
  fail "the refusal of promote does not say 'connected and mirroring: promoting now would fence a live source'"
[ ! -e "$ROOT/$NAME/PROMOTED" ] || fail "a refused promote left $ROOT/$NAME/PROMOTED"
run cp -a "$BACKING" "$W/reference"
show "kill -KILL $source_pid     # the source host is lost"
{ kill -KILL "$source_pid"; wait_for "! kill -0 $source_pid" 15; wait "$source_pid" || true; } 2>/dev/null
source_pid=""
# A killed source is noticed at the QUIC idle timeout (about 3 s).
wait_for '[ "$(dest_field connected)" = false ]' 15
on dest fs-dest status --root "$ROOT"

# ==================================================================================================
step "10. promote"
on dest fs-dest status --root "$ROOT"
show_on dest "fs-dest promote --root $ROOT --source $NAME"
out=$(q dest fs-dest promote --root "$ROOT" --source "$NAME") ||
  fail "fs-dest promote exited with status $?"
echo "$out"
grep -q "promoted $NAME at generation 1: applied" <<<"$out" || fail "promote did not say 'promoted $NAME at generation 1'"
grep -q "is now a primary volume; the old source is fenced" <<<"$out" || fail "promote did not say the old source is fenced"
run cat "$ROOT/$NAME/PROMOTED"
grep -q '"complete": true' "$ROOT/$NAME/PROMOTED" || fail "PROMOTED does not say complete: true"
[ "$(dest_field generation)" = 1 ] || fail "fs-dest status: generation is not 1 after promote"
# Recovery point zero: every acknowledged write is in the image.
same_tree "$W/reference" "$IMAGE" "promoted image = everything acknowledged"

# ==================================================================================================
step "11. the promoted image served as a primary (unmirrored)"
start_daemon fs-source-promoted "fs-source: mounted" promoted_pid \
  dest-fuse fs-source mount --backing "$IMAGE" --mountpoint "$P_MNT" --generation 1 \
  --nvram "$P_NVRAM" --name "$NAME"
on dest fs-source status --mountpoint "$P_MNT"
[ "$(src_field link "$P_MNT" dest)" = none ] || fail "the promoted volume's status does not say link none"
workload "$P_MNT" promoted
run rm "$P_MNT/late/bin/blob"
on dest fs-source cp --mountpoint "$P_MNT"
run cp -a "$IMAGE" "$W/promoted-state"

# ==================================================================================================
step "12. the old source comes back: fenced"
# Same host, same backing directory and NVRAM as when it was killed; the dead mount it left is
# detached by the next mount.
run_sh "grep -c ' $MNT ' /proc/mounts     # the dead mount the killed source left"
show_on source "fs-source mount --backing $BACKING --mountpoint $MNT --dest $DEST_IP:$PORT --name $NAME --nvram $S_NVRAM --tls $S_TLS --partition-size $PARTITION"
rc=0
q source fs-source mount --backing "$BACKING" --mountpoint "$MNT" \
  --dest "$DEST_IP:$PORT" --name "$NAME" --nvram "$S_NVRAM" --tls "$S_TLS" --partition-size "$PARTITION" \
  >"$LOGS/fs-source-fenced.out" 2>"$LOGS/fs-source-fenced.log" || rc=$?
cat "$LOGS/fs-source-fenced.out" "$LOGS/fs-source-fenced.log"
[ "$rc" != 0 ] || fail "the old source mounted; the runbook says it is refused"
[ "$rc" != 124 ] || fail "the old source's mount neither mounted nor exited within 60 s"
echo "exit status $rc"
grep -q "was promoted at generation 1" "$LOGS/fs-source-fenced.log" ||
  fail "the refusal does not name the promotion ('was promoted at generation 1')"
grep -q "is fenced" "$LOGS/fs-source-fenced.log" || fail "the refusal does not say 'is fenced'"
grep -q "found a stale mount whose fs-source is gone (killed?) and detached it" "$LOGS/fs-source-fenced.log" ||
  fail "the mount did not say it detached the dead mount (see Mount safety in docs/operations.md)"
grep -q "fs-dest reseed" "$LOGS/fs-source-fenced.log" || fail "the refusal does not say how to fail back (fs-dest reseed)"
! grep -q " $MNT " /proc/mounts || fail "the fenced source left $MNT mounted"
same_tree "$W/promoted-state" "$IMAGE" "nothing of the fenced source reached the image"

# ==================================================================================================
step "13. failback: stop the promoted volume, reseed, demote, mount at generation 1"
show "kill -TERM $promoted_pid     # stop every writer of the promoted volume"
kill -TERM "$promoted_pid"
wait_for "! kill -0 $promoted_pid" 30
wait "$promoted_pid" || fail "the promoted fs-source exited with status $? after SIGTERM"
promoted_pid=""
on dest fs-dest reseed --from "$IMAGE" --to "$BACKING" --dry-run
show_on dest "fs-dest reseed --from $IMAGE --to $BACKING"
out=$(q dest fs-dest reseed --from "$IMAGE" --to "$BACKING") || fail "fs-dest reseed exited with status $?"
echo "$out"
grep -q "^fs-dest: reseed: copied" <<<"$out" || fail "reseed printed no summary"
same_tree "$IMAGE" "$BACKING" "backing = promoted volume after reseed"
show_on dest "fs-dest reseed --from $IMAGE --to $BACKING     # again: copies nothing"
out=$(q dest fs-dest reseed --from "$IMAGE" --to "$BACKING") || fail "fs-dest reseed exited with status $?"
echo "$out"
grep -q "copied 0 files (0 bytes), created 0, updated metadata of 0, deleted 0" <<<"$out" ||
  fail "the second reseed changed something"
show_on dest "fs-dest demote --root $ROOT --source $NAME"
out=$(q dest fs-dest demote --root "$ROOT" --source "$NAME") || fail "fs-dest demote exited with status $?"
echo "$out"
grep -q "demoted $NAME: .*--generation 1" <<<"$out" || fail "demote did not name --generation 1"
[ ! -e "$ROOT/$NAME/PROMOTED" ] || fail "PROMOTED still exists after demote"
run ls "$(dirname "$S_NVRAM")"
run cp "$S_NVRAM" "$W/stale.nvram"
run rm "$S_NVRAM"
# The stale NVRAM (generation 0) stays fenced after the demote.
show_on source "fs-source mount --backing $W/scratch --mountpoint $W/source/mnt/scratch --nvram $W/stale.nvram ...     # stale: refused"
mkdir -p "$W/scratch" "$W/source/mnt/scratch"
rc=0
q source fs-source mount --backing "$W/scratch" --mountpoint "$W/source/mnt/scratch" \
  --dest "$DEST_IP:$PORT" --name "$NAME" --nvram "$W/stale.nvram" --tls "$S_TLS" \
  --partition-size "$PARTITION" >"$LOGS/fs-source-stale.out" 2>"$LOGS/fs-source-stale.log" || rc=$?
grep "^fs-source:" "$LOGS/fs-source-stale.log" || true
[ "$rc" != 0 ] || fail "a source with the stale NVRAM mounted after the demote"
grep -q "is fenced" "$LOGS/fs-source-stale.log" || fail "the stale NVRAM was refused, but not as fenced"
! grep -q " $W/source/mnt/scratch " /proc/mounts || fail "the stale source left its mount"
start_daemon fs-source-failback "fs-source: mounted" source_pid \
  source fs-source mount --backing "$BACKING" --mountpoint "$MNT" --dest "$DEST_IP:$PORT" \
  --name "$NAME" --nvram "$S_NVRAM" --tls "$S_TLS" --generation 1 --timeout-ms "$TIMEOUT_MS"
workload "$MNT" after-failback
on source fs-source cp --mountpoint "$MNT"
on dest fs-dest status --root "$ROOT"
[ "$(dest_field generation)" = 1 ] || fail "fs-dest status: generation is not 1 after failback"
[ "$(dest_field connected)" = true ] || fail "fs-dest status: the failed-back source is not connected"
[ "$(dest_field applied_seq)" = "$(src_field last_applied_seq)" ] ||
  fail "fs-dest status and fs-source status disagree on the applied sequence"
same_tree "$BACKING" "$IMAGE" "image = backing after failback"

# ==================================================================================================
step "14. stop"
on source fs-source status --mountpoint "$MNT"
show "kill -TERM $source_pid     # fs-source unmounts and exits 0"
kill -TERM "$source_pid"
wait_for "! kill -0 $source_pid" 30
wait "$source_pid" || fail "fs-source exited with status $? after SIGTERM"
source_pid=""
! grep -q " $MNT " /proc/mounts || fail "fs-source exited but left $MNT mounted"
show "kill -TERM $dest_pid     # fs-dest serve"
kill -TERM "$dest_pid"
wait_for "! kill -0 $dest_pid" 30
wait "$dest_pid" || fail "fs-dest serve exited with status $? after SIGTERM"
dest_pid=""
echo
echo "two-hosts.sh: the runbook holds: every step passed"
