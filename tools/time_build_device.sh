#!/usr/bin/env bash
# On the lent GPU machine, alone or next to tools/results_device.sh: times a whole `build` (tools/time_build.py;
# default a CIFAR-size UNet) in the background so that it can span several <= 10 min device calls while the machine
# stays warm. Each call: installs the carried wheels (.whl/) once, starts the build once,
# then copies what it wrote so far (timing JSON once finished, log, the run's run.json with per-stage seconds) to
# $OUT. Runs at nice 10 with one CPU thread, like the scheduler's jobs; the timing is taken next to whatever else
# the GPU runs (say so where it is quoted).
# Usage (device, repository root): bash tools/time_build_device.sh [time_build.py args]  (& then results_device.sh)
set -u
OUT=${OUT:-/tmp/out}
TB=/tmp/tb
mkdir -p "$OUT" "$TB"
source "$(dirname "$0")/device_wheels.sh"
if [ ! -f "$TB/started" ]; then
  touch "$TB/started"
  mkdir -p "$TB/repo" && cp -r pqcad_export calibration engines tools pyproject.toml "$TB/repo"/
  # its own session (setsid), so that it outlives this call like results_device.sh's scheduler
  setsid nohup bash -c 'cd /tmp/tb/repo && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 \
      python3 tools/time_build.py --out /tmp/tb/build --json /tmp/tb/time_build.json "$@"
    echo "exit $?"' time_build "$@" > "$TB/log" 2>&1 < /dev/null &
fi
cp "$TB/log" "$OUT/time_build.log" 2>/dev/null
cp "$TB/time_build.json" "$OUT/" 2>/dev/null
cp "$TB/build/run/run.json" "$OUT/time_build_run.json" 2>/dev/null
true
