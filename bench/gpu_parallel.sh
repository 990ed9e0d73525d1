#!/bin/bash
# One batch of work on a machine of several GPUs: jobs (quoted lists of bench/gpu_run.sh steps) run at once,
# job i on GPU i, or on the GPUs a "LIST:" prefix names ("2,3:mlptp" runs TP 2 on GPUs 2 and 3). Logs and
# results come back as one archive, $OUT/$ARCHIVE.tgz (g<i>/...; ARCHIVE defaults to runs), since few files return.
# usage: bench/gpu_parallel.sh "0:backend prod tests" "1:full" "2,3:mlptp"
#   JOB_TIMEOUT (default 560 s) bounds each job, so the archive is written inside the call's limit.
runs=$(mktemp -d)
i=0
for job in "$@"; do
  gpus=$i steps=$job
  if [[ $job == *:* ]]; then gpus=${job%%:*} steps=${job#*:}; fi
  mkdir -p $runs/g$i
  CUDA_VISIBLE_DEVICES=$gpus OUT=$runs/g$i timeout ${JOB_TIMEOUT:-560} bash bench/gpu_run.sh $steps \
    > $runs/g$i/stdout.txt 2>&1 &
  i=$((i + 1))
done
wait
for d in $runs/g*; do echo "== $d"; cat $d/stdout.txt; done
tar czf $OUT/${ARCHIVE:-runs}.tgz -C $runs .
