#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA device and ami's dependencies importable: the CUDA tests, the planner
# benchmark on the GPU (the agent's setting and the batch x horizon x iterations grid; the whole-plan CUDA graph at
# the agent's setting and at 1,024 x 16 x 10), and a TwoRooms reward-free
# training run on the GPU, timed. CI has no GPU and never runs this. Logs go to $OUT (default runs/gpu_check).
set -uo pipefail
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name())" 2>&1 | tee "$out/gpu.log"
# The tests took 69 s and 105 s on an H200; torch's DEBUG trace logs would bury a failure's traceback.
timeout 300 python3 -m pytest -q -n 0 --tb=short -p no:cacheprovider -p no:logging --durations=0 tests/test_gpu.py 2>&1 \
    | tee -a "$out/gpu.log"
timeout 90 python3 -m ami.cli bench planner --device cuda --compile off --grid --repeats 10 --out "$out/planner" \
    2>&1 | grep -v Warning | tee -a "$out/gpu.log"
# The whole plan as one CUDA graph (agent.actor.compile_plan), at the agent's setting and at 1,024 x 16 x 10.
timeout 240 python3 -m ami.cli bench planner --device cuda --compile plan --repeats 20 --out "$out/plan_graph" \
    2>&1 | grep -v Warning | tee -a "$out/gpu.log"
timeout 240 python3 -m ami.cli bench planner --device cuda --compile plan --repeats 20 agent.actor.candidates=1024 \
    agent.actor.horizon=16 agent.actor.iterations=10 --out "$out/plan_graph_1024" 2>&1 | grep -v Warning \
    | tee -a "$out/gpu.log"
start=$(date +%s)
timeout "${TRAIN_TIMEOUT:-200}" python3 -m ami.cli train env=two_rooms device=cuda seed=0 runs_dir="$out/runs" 2>&1 \
    | tr '\r' '\n' > "$out/two_rooms_train.log"
grep -E "parameters|done:" "$out/two_rooms_train.log" | tee -a "$out/gpu.log"
grep -E "update/s" "$out/two_rooms_train.log" | awk 'NR % 200 == 0' | cut -c1-160 | tee -a "$out/gpu.log"
echo "two_rooms reward-free training on cuda: $(( $(date +%s) - start )) s (limit ${TRAIN_TIMEOUT:-200} s)" \
    | tee -a "$out/gpu.log"
rm -rf "$out/runs"
