#!/bin/bash
# One device-tool call on a machine of several GPUs: job i (a quoted list of bench/gpu_run.sh steps) runs on
# GPU i, all at once; logs and results come back as one archive, $OUT/runs.tgz (g<i>/...), since few files return.
# usage: bench/gpu_parallel.sh "backend prod tests" "full" "modelfull" "mlp1full"
#   JOB_TIMEOUT (default 560 s) bounds each job, so the archive is written inside the call's limit.
runs=$(mktemp -d)
i=0
for steps in "$@"; do
  mkdir -p $runs/g$i
  CUDA_VISIBLE_DEVICES=$i OUT=$runs/g$i timeout ${JOB_TIMEOUT:-560} bash bench/gpu_run.sh $steps > $runs/g$i/stdout.txt 2>&1 &
  i=$((i + 1))
done
wait
for d in $runs/g*; do echo "== $d"; cat $d/stdout.txt; done
tar czf $OUT/runs.tgz -C $runs .
