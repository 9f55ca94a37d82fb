#!/bin/bash
# The device check of a session lent a GPU, as one bounded run (the device tool's `run`, ~4-5 minutes):
# CUDA tests, where a GPU decode step's time goes, our bench against transformers' (assisted) generation,
# and the server under 8 clients on the GPU. Logs go to $OUT (the device tool's folder; ./gpu-out here).
#
# What it needs beside the tracked tree (the tree that travels is capped at 64 MiB, so the embedded zoo-l's
# weights must stay behind: move s2d/data/default/zoo-l/model.safetensors out for the call and back after):
#   .gpu/zoo/{zoo-s,code_suite.jsonl}, .gpu/foreign_code.jsonl  copies from ../shared (zoo-s is 21 MB)
#   .whl/  wheels for what the GPU image lacks: fastapi, starlette, pydantic(-core), uvicorn, openai, httpx2,
#          httpcore2, truststore, jiter, opentelemetry-api, annotated-types, typing-inspection, sniffio, gguf
#          (pip download --python-version 3.12 --platform manylinux_2_17_x86_64 ...; see the device README)
# Name .gpu and .whl (both in .git/info/exclude) in the run's carry.
OUT=${OUT:-gpu-out}; mkdir -p $OUT
exec > >(tee -a $OUT/run.log) 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false S2D_NATIVE=0
T0=$(date +%s); el() { echo "== $(( $(date +%s) - T0 ))s: $*"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:$PWD
fi
el cuda tests
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > $OUT/cuda.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/cuda.log | head -20
el profile
timeout 60 python3 benchmarks/gpu_profile.py .gpu/zoo > $OUT/profile.log 2>&1; grep "tok/s" $OUT/profile.log
el bench
timeout 90 python3 -m s2d.cli bench --target .gpu/zoo/zoo-s --draft s2d/data/default/draft \
  --methods ar,s2d,hf-ar,hf-assisted --questions .gpu/zoo/code_suite.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --device cuda --dtype bfloat16 --no-progress --out /tmp/bench 2>&1 | tail -8
cp /tmp/bench/results.json $OUT/bench_results.json; cp /tmp/bench/report.md $OUT/bench_report.md
el serve
timeout 70 python3 benchmarks/serve_load.py --zoo .gpu/zoo --targets zoo-s --device cuda \
    --clients 8 --requests 2 --max-tokens 128 --max-slots 8 --prompts-file .gpu/foreign_code.jsonl --prompts 16 \
    --out $OUT/serve_s2d.json 2>&1 | tail -8
el done
