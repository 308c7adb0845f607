#!/usr/bin/env bash
# Figures for issue 11/12: the mirror at a distance. A destination and a source in two network
# namespaces joined by veth (tests/src/netns.rs), with a round-trip time of 0, 1, 5 and 10 ms, 1 % and 5 % random loss (nftables),
# made by nvm-netdelay (NFQUEUE; there is no netem), 5 ms with 5 % of packets reordered, and a
# 100 mbit tbf limit: sequential write MiB/s of one writer, 4 KiB write+fsync p50/p99, creates/s.
#   sudo tests/bench/distance.sh [ROUNDS] [MIB]
# Release build; temp dirs (backing, image, both NVRAM files) on /dev/shm so that the disk does
# not hide the network. Prints a markdown table at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "distance.sh: needs root (namespaces, FUSE)" >&2; exit 1; }
need=()
command -v iptables >/dev/null || need+=(iptables)
command -v ping >/dev/null || need+=(iputils-ping)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --bins -q
export NVMIRROR_BENCH_ROUNDS=${1:-1}
export NVMIRROR_BENCH_MIB=${2:-128}
export NVMIRROR_TEST_TMPDIR=${NVMIRROR_TEST_TMPDIR:-/dev/shm}
cargo test --release -q -p nvmirror-e2e --test distance -- --ignored --nocapture distance_figures
