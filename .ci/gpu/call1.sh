#!/usr/bin/env bash
# The GPU session's first device call (run: command "bash .ci/gpu/call1.sh", carry [".gpu"], timeout_s 600),
# after python .ci/gpu/pack.py here. It unpacks the data, checks the CUDA-graph sampler against the same
# sampler run eagerly, starts the experiment as a daemon (setsid: it outlives the call) and returns near
# its limit with the log so far. The second call (call2.sh) stops it, reports and benchmarks.
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.gpu/tiktoken_cache
export IMDB_ARCHIVE=$(python3 -c "import json; print(json.load(open('.gpu/archive.json'))['path'])")
LOG=$OUT/gpu.log
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; } > $LOG 2>&1
python3 .ci/gpu/unpack.py >> $LOG 2>&1 || { echo "UNPACK FAILED"; cat $LOG; exit 1; }
rm -rf /tmp/repo && cp -r . /tmp/repo  # the daemon runs from a copy: the next call re-sends the tree
if ! timeout 120 python3 .ci/gpu/check_sampler.py >> $LOG 2>&1; then
  echo "=== sampler check failed: this experiment samples eagerly" >> $LOG
  sed -i 's/capture=device.type == "cuda")/capture=False)/' /tmp/repo/sample.py
fi
cd /tmp/repo && setsid nohup bash .ci/gpu/experiment.sh /tmp/run > /tmp/exp.log 2>&1 < /dev/null &
while [ $SECONDS -lt ${CALL1_SECONDS:-570} ]; do sleep 5; done
cp /tmp/exp.log $OUT/exp.log; cp /tmp/run/stage_times.json $OUT/ 2>/dev/null
grep -h "===\|^eval\|sampler\|identical\|tokens/s" $LOG /tmp/exp.log | tail -60
