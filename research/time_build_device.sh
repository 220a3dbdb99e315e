#!/usr/bin/env bash
# On the lent GPU machine: times whole `build`s (python -m research.time_build) in the background so that they can span
# several <= 10 min device calls while the machine stays warm. Each call:
#   - installs the carried wheels (.whl/) once;
#   - with arguments, starts the build NAME once (later calls' arguments are ignored), in its own session, at nice 10
#     with THREADS CPU threads (default 4; use 1 next to research/results_device.sh, whose jobs want the cores);
#   - waits up to WAIT seconds (default 0) until every build started on this machine has ended;
#   - copies what each build wrote so far to $OUT as time_build_NAME.{json,log} and time_build_NAME_run.json
#     (the run's run.json with per-stage seconds; the timing JSON once that build finished).
# Usage (device, repository root):
#   NAME=cifar bash research/time_build_device.sh --model cifar10-32 --device cuda ...   # start (and collect)
#   WAIT=560 bash research/time_build_device.sh                                       # wait and collect
# Builds started side by side share the GPU and CPU: say so where their seconds are quoted.
set -u
OUT=${OUT:-/tmp/out}
NAME=${NAME:-cifar}
THREADS=${THREADS:-4}
WAIT=${WAIT:-0}
T0=$(date +%s)
mkdir -p "$OUT"
source "$(dirname "$0")/device_wheels.sh"
TB=/tmp/tb_$NAME
if [ $# -gt 0 ] && [ ! -f "$TB/started" ]; then
  mkdir -p "$TB/repo" && touch "$TB/started"
  cp -r pqcad_export calibration engines research tools pyproject.toml "$TB/repo"/
  # its own session (setsid), so that it outlives this call
  setsid nohup env TB="$TB" THREADS="$THREADS" bash -c 'cd "$TB/repo" && OMP_NUM_THREADS=$THREADS \
      MKL_NUM_THREADS=$THREADS nice -n 10 python3 -m research.time_build --out "$TB/build" --json "$TB/time_build.json" "$@"
    echo "exit $?"' time_build "$@" > "$TB/log" 2>&1 < /dev/null &
fi
running() {  # names of started builds whose log has no "exit" line yet
  for d in /tmp/tb_*/; do
    [ -f "$d/started" ] && ! grep -q '^exit ' "$d/log" 2>/dev/null && basename "$d"
  done
}
while [ -n "$(running)" ] && [ $(( $(date +%s) - T0 )) -lt "$WAIT" ]; do sleep 10; done
for d in /tmp/tb_*/; do
  n=$(basename "$d"); n=${n#tb_}
  cp "$d/log" "$OUT/time_build_$n.log" 2>/dev/null
  cp "$d/time_build.json" "$OUT/time_build_$n.json" 2>/dev/null
  cp "$d/build/run/run.json" "$OUT/time_build_${n}_run.json" 2>/dev/null
done
echo "still running: $(running | tr '\n' ' ')"
true
