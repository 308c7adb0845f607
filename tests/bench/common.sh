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
