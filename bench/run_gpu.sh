#!/usr/bin/env bash
# One device call: the seed anchors and medtune's training path on the same random Llama-3.1-8B and
# the same real-length token ids. Expects (carried, git-ignored):
#   .whl/    wheels: bitsandbytes peft liger-kernel datasets transformers pydantic(+core) rich ...
#   .bench/  ../shared/bench/seed_recipe_baseline.py and medical_token_ids.json.gz
# Writes one JSON line per run to $OUT/results.jsonl (copy it to bench/results/<date>-<card>.jsonl).
set -u
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gunzip -c .bench/medical_token_ids.json.gz > /tmp/ids.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
M=/tmp/llama31-8b-random
[ -f $M/config.json ] || python3 .bench/seed_recipe_baseline.py make --model-dir $M | tee -a "$OUT/results.jsonl"
step() {  # step SECONDS LABEL CMD...: one run, its JSON line appended, its stderr kept on failure
  local limit=$1 label=$2; shift 2
  echo "== $label" >&2
  timeout "$limit" "$@" > "/tmp/$label.out" 2> "/tmp/$label.err"
  local rc=$?
  grep '^{' "/tmp/$label.out" | tee -a "$OUT/results.jsonl"
  [ $rc -eq 0 ] || { echo "{\"run\": \"$label\", \"failed\": $rc}" | tee -a "$OUT/results.jsonl"; tail -25 "/tmp/$label.err" >&2; }
}
IDS=/tmp/ids.json
for run in ${RUNS:-seedfast tuned_gc medtune_qlora medtune_bf16}; do
  case $run in
    seed|seedfast|tuned_gc|tuned_nogc|bf16lora)
      step 240 "$run" python3 .bench/seed_recipe_baseline.py "$run" --model-dir $M --data-dir $IDS --steps 3 --warm 1 ;;
    medtune_qlora)
      step 240 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit ${MT_ARGS:-} --label "$run" ;;
    medtune_bf16)
      step 240 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization none ${MT_ARGS:-} --label "$run" ;;
    medtune_qlora_mb16)  # 16 rows (~5k real tokens) per forward, one micro batch per step
      step 240 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit --micro-batch 16 --grad-accum 2 ${MT_ARGS:-} --label "$run" ;;
    medtune_qlora_packed)  # padding-free packing, 26 rows (~8k tokens) per forward, ~32k tokens per step
      step 300 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit --packing --micro-batch 26 --grad-accum 4 ${MT_ARGS:-} --label "$run" ;;
    medtune_qlora_packed_merge)  # as above, then merge the adapter into bf16 shards and reload them
      step 420 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit --packing --micro-batch 26 --grad-accum 4 --merge ${MT_ARGS:-} --label "$run" ;;
    medtune_qlora_packed_nogc)  # 13 rows (~4k tokens) per forward without recompute
      step 300 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit --packing --micro-batch 13 --grad-accum 8 --no-gc ${MT_ARGS:-} --label "$run" ;;
    medtune_qlora_mb26)  # no packing: 26 length-grouped rows per forward, padded, SDPA
      step 300 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization 4bit --micro-batch 26 --grad-accum 4 ${MT_ARGS:-} --label "$run" ;;
    medtune_bf16_packed)
      step 300 "$run" python3 bench/gpu_train.py --model-dir $M --ids $IDS --quantization none --packing --micro-batch 26 --grad-accum 4 ${MT_ARGS:-} --label "$run" ;;
  esac
done
