#!/usr/bin/env bash
# Draw docs/benchmarks.png from the raw lines of tests/bench/run.sh (RAW_OUT=FILE): left, the
# throughput of every system relative to bindfs per workload (median over rounds); right, the
# 4 KiB write+fsync latency per system (median of the per-round p50 and p99 of write + fsync).
#
#   RAW_OUT=/tmp/bench.raw sudo tests/bench/run.sh 3 && tests/bench/plot.sh /tmp/bench.raw [OUT.png]
#
# Needs gnuplot (package gnuplot-nox, installed with apt-get if missing) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
RAW=${1:?usage: plot.sh RAWFILE [OUT.png]}
OUT=${2:-docs/benchmarks.png}
. tests/bench/common.sh
bench_need gnuplot=gnuplot-nox
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
python3 - "$RAW" "$T" <<'PY'
import collections, statistics, sys
raw, out = sys.argv[1], sys.argv[2]
v = collections.defaultdict(list)          # (label, workload, metric) -> values over rounds
order = []
for line in open(raw):
    f = line.split()
    if len(f) != 5 or f[0] == "0" or f[2] == "env":
        continue
    _, label, wl, metric, value = f
    if label not in order:
        order.append(label)
    v[(label, wl, metric)].append(float(value))
med = lambda k: statistics.median(v[k]) if v.get(k) else float("nan")
tput = [("seqwrite_1M", "MB/s", "seq write", False), ("randwrite4k_fsync", "IOPS", "4K write+fsync", False),
        ("meta_create", "files/s", "create", False), ("meta_stat", "files/s", "stat", False),
        ("meta_delete", "files/s", "delete", False), ("untar", "s", "untar", True)]
systems = [s for s in order if s not in ("native",)]
with open(f"{out}/tput.dat", "w") as f:
    f.write("workload " + " ".join(systems) + "\n")
    for wl, m, name, lower in tput:
        base = med(("bindfs", wl, m))
        cells = []
        for s in systems:
            x = med((s, wl, m))
            r = (base / x if lower else x / base) if base == base and x == x and x and base else float("nan")
            cells.append(f"{r:.3f}")
        f.write(f'"{name}" ' + " ".join(cells) + "\n")
with open(f"{out}/lat.dat", "w") as f:
    f.write("system write_p50 write_p99 fsync_p50 fsync_p99\n")
    for s in order:
        k = lambda m: med((s, "randwrite4k_fsync", m))
        f.write(f'"{s}" {k("write_p50_us"):.1f} {k("write_p99_us"):.1f} {k("fsync_p50_us"):.1f} {k("fsync_p99_us"):.1f}\n')
with open(f"{out}/n", "w") as f:
    f.write(str(len(systems)))
rounds = {l.split()[0] for l in open(raw) if l.split() and l.split()[0] != "0"}
with open(f"{out}/rounds", "w") as f:
    f.write(str(len(rounds)))
PY
n=$(cat "$T/n")
rounds=$(cat "$T/rounds")
gnuplot <<GP
set terminal pngcairo noenhanced size 1400,520 font "sans,10"
set output "$OUT"
set multiplot layout 1,2 title "nvmirror vs bindfs and peers: median of $rounds round(s) of tests/bench/run.sh"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key top left
set grid ytics
set ylabel "throughput relative to bindfs (higher is better; untar: bindfs time / time)"
set yrange [0:*]
set xtics rotate by -20
plot for [i=2:$((n + 1))] "$T/tput.dat" using i:xtic(1) title columnheader, 1 with lines lc "black" dt 2 notitle
set ylabel "microseconds (log scale)"
set logscale y
set yrange [1:*]
set title "4 KiB random write + fsync: latency per operation"
plot for [i=2:5] "$T/lat.dat" using i:xtic(1) title columnheader
unset multiplot
GP
echo "plot.sh: wrote $OUT"
