#!/usr/bin/env bash
# One short call on a lent GPU machine (see the device tool's README): install the device kit
# (scripts/gpu_kit/, its parts gathered in earlier back-to-back calls; the machine has no
# network), then write into $OUT (default gpu-report/):
# doctor.json (providers, FAISS GPUs, where each stage runs and why not on the GPU),
# parity.json (GPU vs CPU image scores, exact search, relative 1e-4), bench.json (batch 1, 8,
# 32, 128, exact flat index on the GPU), agent-8.json and agent-32.json (the agent end to end
# from the folder at max-batch 8 and 32, when an MQTT broker can run: Mosquitto or amqtt) and
# gpu_memory.csv (nvidia-smi's memory.used every 200 ms while they run).
# Usage: scripts/gpu_check.sh BUNDLE DATA
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: scripts/gpu_check.sh BUNDLE DATA}
data=${2:?usage: scripts/gpu_check.sh BUNDLE DATA}
out=${OUT:-gpu-report}
py=${PYTHON:-python3}
mkdir -p "$out"
if [ -f .gpu_kit/kit.json ]; then
  "$py" scripts/gpu_kit/install.py install .gpu_kit --require-gpu || exit 2
fi
"$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . || true
sampler=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 200 \
    > "$out/gpu_memory.csv" &
  sampler=$!
fi
status=0
"$py" -m edge_agent doctor --bundle "$bundle" --device cuda --json | tail -n 1 > "$out/doctor.json"
"$py" scripts/gpu_parity.py "$bundle" "$data" > "$out/parity.json" || status=1
"$py" -m edge_agent bench --bundle "$bundle" --data "$data" --device cuda --index flat \
  --batch 1 8 32 128 --json | tail -n 1 > "$out/bench.json" || status=1
for batch in 8 32; do
  "$py" -m edge_agent bench --agent --bundle "$bundle" --data "$data" --device cuda \
    --index flat --max-batch "$batch" --json | tail -n 1 > "$out/agent-$batch.json" || status=1
done
[ -n "$sampler" ] && kill "$sampler"
cat "$out/doctor.json" "$out/parity.json"
echo "gpu_check: report in $out ($([ $status -eq 0 ] && echo ok || echo FAILED))"
exit $status
