#!/bin/bash
# issue 12 speed check: routing_overhead before (main 92313c5 = /tmp/before) vs after (/work/main), ABBA, quiet machine
ARGS="--sizes 16 --batch 2 --prompt 32 --new 16 --repeats 3 --routers base hilora-gathered"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_PLATFORMS=cpu
i=0
for side in before after after before; do
  i=$((i+1))
  if [ $side = before ]; then root=/tmp/before; else root=/work/main; fi
  echo "== run $i $side $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  ( cd $root && PYTHONPATH=$root /work/main/.venv/bin/python benchmarks/routing_overhead.py $ARGS --out /work/logs/ro_${i}_$side.json ) > /work/logs/ro_${i}_$side.log 2>&1
  echo "   done $(date -u +%T)"
done
