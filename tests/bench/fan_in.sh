#!/usr/bin/env bash
# Figures for issue 11 (fan-in at scale, docs/scale.md): 1, 4, 16 and 64 sources mirroring at
# once into one fs-dest, each running 4 KiB write+fsync for SECS seconds (per-source and total
# throughput, p50/p99 latency, fs-dest VmRSS/VmHWM and open fds, fs-source RSS); then the
# isolation cases: source A's write+fsync alone, while B fills a 64 MiB partition and runs
# `fs-source cp`, while hostile clients C flood bad records, and while D is SIGSTOPped
# mid-stream (with the default 2 s idle timeout, and with 60 s so its connection stays open).
#   sudo tests/bench/fan_in.sh [SECS] [SOURCES]      e.g. tests/bench/fan_in.sh 10 1,4,16,64
# Release build (built once); temp dirs (backing, images, NVRAM files) on /dev/shm. Prints
# markdown tables at the end. Timing never fails the run; a wrong image does.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "fan_in.sh: needs root (FUSE mounts)" >&2; exit 1; }
cargo build --release --bins -q
export NVMIRROR_BENCH_SECS=${1:-10}
export NVMIRROR_BENCH_SOURCES=${2-1,4,16,64}   # "" = isolation cases only
export NVMIRROR_TEST_TMPDIR=${NVMIRROR_TEST_TMPDIR:-/dev/shm}
cargo test --release -q -p nvmirror-e2e --test fan_in_scale -- --ignored --nocapture fan_in_figures
