#!/usr/bin/env bash
# The second device call, at once after the first (STOP_AT=seconds env var: when to stop the experiment,
# leaving time for the report and bench.py within the session's device time):
#   command "STOP_AT=120 bash .ci/gpu/call2.sh", carry [".gpu"]
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.gpu/tiktoken_cache
export IMDB_ARCHIVE=$(python3 -c "import json; print(json.load(open('.gpu/archive.json'))['path'])")
while [ $SECONDS -lt $STOP_AT ] && ! grep -q "experiment finished" /tmp/exp.log; do sleep 3; done
pkill -TERM -f experiment.sh; pkill -TERM -f train.py; sleep 3; pkill -KILL -f train.py
cd /tmp/repo
python3 .ci/gpu/finish.py /tmp/run $OUT > $OUT/report.log 2>&1
cp /tmp/exp.log $OUT/exp.log; cp /tmp/run/stage_times.json $OUT/ 2>/dev/null
[ "${BENCH:-1}" = 1 ] && timeout ${BENCH_SECONDS:-60} python3 bench.py --only sample,eval,ppo --out-json $OUT/bench.json > $OUT/bench.log 2>&1
cat $OUT/report.log; tail -15 $OUT/bench.log
