#!/usr/bin/env bash
# One device call: the seed anchors and medtune's training path on the same random Llama-3.1-8B and
# the same real-length token ids. Expects (carried, git-ignored):
#   .whl/    wheels: bitsandbytes peft liger-kernel datasets transformers pydantic(+core) ... (first call
#            on a machine; later calls on the same warm machine reuse /tmp/site); bench/make_wheels.sh builds it
#   .bench/  (bench/make_bench_dir.py) from ../shared/bench: seed_recipe_baseline.py, unsloth_anchor.py, medical_token_ids.json.gz;
#            llama3-tok/ (a BPE tokenizer with the Llama 3 special tokens, for the end-to-end run) and
#            medical_600.jsonl (the first 600 rows of ../shared/datasets/medical_mistral_instruct_dataset_short)
#   .whl2/   only for the `unsloth*` runs: Unsloth and its dependencies (../shared/bench/README.md)
#   .whlfa4a/, .whlfa4b/  only for `fa4stage`/`fa4check` (bench/make_fa4_wheels.sh), one per call
#   .whlpytest/  only for `fsdp_test`: pytest, pluggy, iniconfig (apart from .whl/ so that .whl/ + .bench/ fit the
#            64 MiB a call carries; fsdp_test needs no .bench/)
# Writes one JSON line per run to $OUT/results.jsonl (copy it to bench/results/<date>-<card>-x.jsonl).
set -u
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
T=${RUN_TMP:-/tmp}; mkdir -p "$T"  # each run's stdout and stderr (bench/run_gpu2.sh: one folder per GPU)
GPU=${CUDA_VISIBLE_DEVICES:+-i $CUDA_VISIBLE_DEVICES}  # nvidia-smi's card: the one the runs see
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls .whlpytest/*.whl 2>/dev/null) \
    && touch /tmp/site/.done || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f /tmp/ids.json ] || gunzip -c .bench/medical_token_ids.json.gz > /tmp/ids.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
M=/tmp/llama31-8b-random
if [ ! -f $M/config.json ] && [ "${RUNS:-}" != fsdp_test ]; then  # fsdp_test trains the tiny model only
  python3 .bench/seed_recipe_baseline.py make --model-dir $M | tee -a "$OUT/results.jsonl"
  gunzip -c .bench/llama3-tok/tokenizer.json.gz > $M/tokenizer.json
  cp .bench/llama3-tok/tokenizer_config.json $M/
fi
step() {  # step SECONDS LABEL CMD...: one run, its JSON line appended, its stderr kept on failure
  local limit=$1 label=$2; shift 2
  # COOL=SECONDS: the card left idle that long before each run, so that runs compared start from the same
  # thermal state (at the 700 W cap a warm card clocks lower: 2026-11-29 calls ae-ah, docs/benchmarks.md)
  [ -n "${COOL:-}" ] && sleep "$COOL"
  local state; state=$(nvidia-smi $GPU --query-gpu=temperature.gpu,clocks.sm,power.draw --format=csv,noheader,nounits 2>/dev/null | head -1)
  echo "{\"run_start\": \"$label\", \"temp_c_mhz_w\": \"$state\"}" >> "$OUT/results.jsonl"
  echo "== $label $(date +%T)" >&2
  timeout "$limit" "$@" > "$T/$label.out" 2> "$T/$label.err"
  local rc=$?
  grep '^{' "$T/$label.out" | tee -a "$OUT/results.jsonl"
  [ $rc -eq 0 ] || { echo "{\"run\": \"$label\", \"failed\": $rc}" | tee -a "$OUT/results.jsonl"; tail -25 "$T/$label.err" >&2; }
}
IDS=/tmp/ids.json
if [ -n "${SMI:-}" ]; then  # SMI=1: the card's SM clock, power, temperature and clock-limit reasons every 500 ms
  nvidia-smi $GPU --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 500 > "$OUT/smi.csv" 2>&1 &
  SMI_PID=$!
fi
GT="python3 bench/gpu_train.py --model-dir $M --ids $IDS"
# FlashAttention 4's install (fa4check): the CuTe DSL's `cutlass` package sits where its .pth file (not read from
# a --target folder) would have put it on sys.path
FA4PATH=/tmp/site3:/tmp/site3/nvidia_cutlass_dsl/dsl_packages
for run in ${RUNS:-seedfast tuned_gc medtune_varlen}; do
  case $run in
    seed|seedfast|tuned_gc|tuned_nogc|bf16lora)
      step 240 "$run" python3 .bench/seed_recipe_baseline.py "$run" --model-dir $M --data-dir $IDS --steps 3 --warm 1 ;;
    unsloth0|unsloth05)  # Unsloth's QLoRA path (its own recompute), micro batch 4 x 2048, GA 4
      [ -f /tmp/site2/.done ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site2 .whl2/*.whl && touch /tmp/site2/.done; }
      d=0.0; [ $run = unsloth05 ] && d=0.05
      step 400 "$run" env PYTHONPATH=/tmp/site2:/tmp/site python3 .bench/unsloth_anchor.py $M $IDS $d ;;
    medtune_varlen)  # QLoRA, padding-free packing + varlen flash attention, 26 rows (~8k tokens) per forward, GA 4
      step 300 "$run" $GT --quantization 4bit --packing --micro-batch 26 --grad-accum 4 --label "$run" ;;
    medtune_varlen_mb52)  # ~16k tokens per forward, GA 2 (the same ~32k tokens per optimizer step)
      step 300 "$run" $GT --quantization 4bit --packing --micro-batch 52 --grad-accum 2 --label "$run" ;;
    medtune_varlen_nogc)  # no recompute, 13 rows (~4k tokens) per forward, GA 8
      step 300 "$run" $GT --quantization 4bit --packing --micro-batch 13 --grad-accum 8 --no-gc --label "$run" ;;
    medtune_varlen_nogc26)  # no recompute, 26 rows per forward, GA 4
      step 300 "$run" $GT --quantization 4bit --packing --micro-batch 26 --grad-accum 4 --no-gc --label "$run" ;;
    medtune_bf16_varlen)
      step 300 "$run" $GT --quantization none --packing --micro-batch 26 --grad-accum 4 --label "$run" ;;
    medtune_bf16_varlen_nogc)
      step 300 "$run" $GT --quantization none --packing --micro-batch 26 --grad-accum 4 --no-gc --label "$run" ;;
    medtune_preset)  # the llama3-8b-medical preset's own batch: 8,192-token bins, GA 1, recompute `auto`
      step 300 "$run" $GT --quantization 4bit --preset-batch --steps 12 --warm 2 --label "$run" ;;
    preset_auto)  # the preset's batch with training.micro_batch_size: auto (sized to this card before loading)
      step 300 "$run" $GT --quantization 4bit --preset-batch --steps 6 --warm 2 --set training.micro_batch_size=auto --label "$run" ;;
    medtune_seedbatch)  # the seed's batch without medtune's levers: 1 padded row x GA 16, fp16 -> bf16 only
      step 300 "$run" $GT --quantization 4bit --micro-batch 1 --grad-accum 16 --plain --label "$run" ;;
    ddp1|ddp2)  # data-parallel scaling: the same per-GPU work (52 packed rows x GA 2) on 1 and on 2 GPUs
      n=${run#ddp}
      step 400 "$run" torchrun --standalone --nproc-per-node "$n" bench/gpu_train.py --model-dir $M --ids $IDS \
        --quantization 4bit --packing --micro-batch 52 --grad-accum 2 --steps 6 --warm 2 --label "medtune_varlen_mb52_gpus$n" ;;
    levers8k|levers16k|levers_bf16)  # bench/profile_levers.py: profile + dropout/recompute levers on one loaded model
      q=4bit; n=8192; [ $run = levers16k ] && n=16384; [ $run = levers_bf16 ] && q=none
      step 300 "$run" python3 bench/profile_levers.py --model-dir $M --ids $IDS --quantization $q --tokens $n ;;
    profile_nogc)  # the profile alone, without recompute (the presets' path on an 80 GB+ card), + the no-recompute levers
      step 240 "$run" python3 bench/profile_levers.py --model-dir $M --ids $IDS --tokens 8192 --no-profile-gc \
        --variants fused_nogc,fusedbw_nogc,fused_nogc_dropout0,fusedbw_nogc_dropout0,peft_nogc --repeats 1 ;;
    graphs_nogc)  # bench/profile_levers.py: decoder layers replayed as CUDA graphs (medtune.layer_graphs) against
      # eager, no recompute, every micro batch padded to 8,192 tokens; the dropout-0 pair also checks agreement
      step 500 "$run" python3 bench/profile_levers.py --model-dir $M --ids $IDS --tokens 8192 --no-profile-gc --no-profile \
        --variants fused_nogc,fused_nogc_graphed,fusedbw_nogc,fusedbw_nogc_graphed,fusedbw_nogc_dropout0,fusedbw_nogc_dropout0_graphed --repeats 2 ;;
    compile_nogc)  # bench/profile_levers.py: regional torch.compile against eager, no recompute
      step 400 "$run" python3 bench/profile_levers.py --model-dir $M --ids $IDS --tokens 8192 --no-profile-gc \
        --variants fused_nogc,fused_nogc_compiled,fusedbw_nogc_compiled --repeats 1 ;;
    bins_ddp1|bins_ddp2)  # scaling with token-budget micro batches: 16384-token bins x GA 2 per GPU
      n=${run#bins_ddp}
      step 400 "$run" torchrun --standalone --nproc-per-node "$n" bench/gpu_train.py --model-dir $M --ids $IDS \
        --quantization 4bit --tokens 16384 --grad-accum 2 --steps 6 --warm 2 --label "medtune_bins16k_gpus$n" ;;
    bins_gc)  # QLoRA, 16384-token bins x GA 2, recompute on (fits a 24 GB card)
      step 300 "$run" $GT --quantization 4bit --tokens 16384 --grad-accum 2 --steps 6 --warm 2 --label "$run" ;;
    bins_nogc_bf16ig)  # bins_nogc with the input-gradient GEMMs in bf16 (the path before float8), one whole run
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --lever bf16inputgrad --label "$run" ;;
    bins_nogc|bins_nogc_noshared|bins_nogc_fp8fwd|bins_nogc_fp8grp|bins_nogc_fp8o|bins_nogc_nofp8fwd|bins_nogc_w0|bins_nogc_fp8mlp|bins_nogc_groupgrad|bins_nogc_fusedadam|bins_nogc_groupqkv|bins_nogc_fp8o_groupqkv|bins_nogc_s16)  # QLoRA,
      # 8192-token bins x GA 4, no recompute (~85 GiB: an H200; 4096-token bins for an H100); STEPS= timed steps (6);
      # _noshared: q/k/v and gate/up each run alone (lever noshared); the forward's base GEMMs in float8 for every
      # projection (_fp8fwd), q/k/v and gate/up (_fp8grp: the default since session 15), those and o (_fp8o), none
      # (_nofp8fwd), gate/up/down (_fp8mlp); _groupgrad: a group's input gradients as one float8 GEMM; _fusedadam:
      # AdamW in one fused kernel; _groupqkv: q/k/v's input gradients as one float8 GEMM (gate/up apart); _fp8o_groupqkv:
      # that and o's forward in float8 (both the default since session 17: these two now run the default path);
      # _s16: the default path of session 16 (q/k/v, gate/up forward in float8, each input gradient apart); _w0: the micro batches
      # collated in the training process (training.dataloader_workers=0, the default before session 16; now 2
      # workers on a GPU); each a whole run
      case $run in bins_nogc_noshared) f="--lever noshared" ;; bins_nogc_fp8fwd) f="--lever fp8forward" ;;
        bins_nogc_fp8grp) f="--lever fp8groups" ;; bins_nogc_fp8o) f="--lever fp8witho" ;;
        bins_nogc_nofp8fwd) f="--lever nofp8forward" ;; bins_nogc_w0) f="--set training.dataloader_workers=0" ;;
        bins_nogc_fp8mlp) f="--lever fp8mlp" ;; bins_nogc_groupgrad) f="--lever groupgrad" ;;
        bins_nogc_fusedadam) f="--set training.optimizer=adamw_torch_fused" ;;
        bins_nogc_groupqkv) f="--lever groupqkv" ;; bins_nogc_fp8o_groupqkv) f="--lever fp8witho --lever groupqkv" ;; bins_nogc_s16) f="--lever fp8groups --lever groupnone" ;;
        *) f="" ;; esac
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps ${STEPS:-6} --warm 2 --no-gc $f --label "$run" ;;
    bins_nogc_fp8|bins_nogc_fbw_short|bins_nogc_fbw_fp8|bins_nogc_short|bins_nogc_graphs|bins_nogc_fbw_graphs|bins_nogc_fp8_graphs)
      # A/B, 3 timed steps after 1: float8 base GEMMs (medtune.fast_lora.Fp8Base), the fused LoRA backward
      # (LoraLinear), both, the default path; decoder layers as CUDA graphs (training.cuda_graphs), alone and
      # with the fused backward. Since 2026-11-28 19:40 the fused backward is the default path: these
      # commands then measure it throughout (bins_nogc_fwd: the fused forward alone, the former default)
      case $run in bins_nogc_fp8) f=--fp8-base ;; bins_nogc_fbw_short) f=--fused-backward ;;
        bins_nogc_fbw_fp8) f="--fused-backward --fp8-base" ;; bins_nogc_graphs) f="--set training.cuda_graphs=true" ;;
        bins_nogc_fbw_graphs) f="--fused-backward --set training.cuda_graphs=true" ;;
        bins_nogc_fp8_graphs) f="--fp8-base --set training.cuda_graphs=true" ;; *) f="" ;; esac
      st="--steps 3 --warm 1"; [ -n "${LONG:-}" ] && st="--steps 6 --warm 2"  # LONG=1: as bins_nogc
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 $st --no-gc $f --label "$run" ;;
    groupcheck)  # bench/group_grad_check.py: a group's input gradients as one float8 GEMM against one per member
      step 200 "$run" python3 bench/group_grad_check.py ;;
    dropcheck)  # bench/lora_dropout_check.py: the dropout kernels against PyTorch ops, values and time
      step 200 "$run" python3 bench/lora_dropout_check.py ;;
    dropgroup)  # bench/lora_dropout_check.py --group: the kernels over q/k/v and gate/up at once against one launch each
      step 200 "$run" python3 bench/lora_dropout_check.py --group ;;
    dropsweep)  # bench/lora_dropout_check.py --sweep: the forward and input-gradient kernels' launch settings
      step 300 "$run" python3 bench/lora_dropout_check.py --sweep ;;
    fa4stage)  # FlashAttention 4's wheels, carried in two calls on one warm machine (bench/make_fa4_wheels.sh):
      # .whlfa4a/ in one, .whlfa4b/ in the next, each copied here until fa4check joins and installs them
      mkdir -p /tmp/fa4stage && cp .whlfa4a/* .whlfa4b/* /tmp/fa4stage/ 2>/dev/null; ls /tmp/fa4stage >&2 ;;
    fa4check)  # bench/fa4_check.py: FlashAttention 4 against FlashGqa (after fa4stage twice)
      if [ ! -f /tmp/site3/.done ]; then
        for part in /tmp/fa4stage/*.whl.part0; do w=${part%.part0}; cat "$w".part* > "$w" && rm "$w".part*; done
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site3 /tmp/fa4stage/*.whl \
          && touch /tmp/site3/.done
      fi
      step 400 "$run" env PYTHONPATH=$FA4PATH:$PYTHONPATH python3 bench/fa4_check.py ;;
    ab_fa4|bins_nogc_fa4)  # FlashAttention 4 for the packed attention (lever fa4, after fa4check installed it): ABBA
      # against PyTorch's flash kernels step by step, or one whole bins_nogc run with it
      f="--ab fa4 --steps ${AB_STEPS:-16}"; [ $run = bins_nogc_fa4 ] && f="--lever fa4 --steps 6"
      step 400 "$run" env PYTHONPATH=$FA4PATH:$PYTHONPATH $GT --quantization 4bit --tokens 8192 --grad-accum 4 $f \
        --warm 2 --no-gc --label "$run" ;;
    gqacheck)  # bench/gqa_check.py: attention.FlashGqa against varlen_attn with k/v repeated, values and time
      step 200 "$run" python3 bench/gqa_check.py ;;
    hostbench)  # bench/host_overhead.py: host time per call of one QLoRA projection's pieces
      step 200 "$run" python3 bench/host_overhead.py ;;
    nf4check)  # bench/nf4_check.py: medtune.nf4's dequantize kernel against bitsandbytes', values and time
      step 200 "$run" python3 bench/nf4_check.py ;;
    acccheck)  # bench/accumulate_check.py: fast_lora.ACCUMULATE_IN_BASE per projection shape, time and error
      step 200 "$run" python3 bench/accumulate_check.py ;;
    bins_nogc_fp8bwd)  # bins_nogc with each nf4 projection's input-gradient GEMM in float8 (--fp8-backward)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --fp8-backward --label "$run" ;;
    ab_repeatkv|ab_noaccumulate|ab_nonf4kernel|ab_elementhash|ab_deferdivergence|ab_nestedbybnb|ab_castpercall|ab_bf16inputgrad|ab_rowstwice|ab_scaleperbyte|ab_noshared|ab_groupgrad|ab_groupqkv|ab_fp8witho)  # bins_nogc alternating ABBA, step by step, between a lever
      # (bench/gpu_train.py LEVERS) and the default path. Calls 2026-11-29 e and g ran ab_accumulate and
      # ab_nf4kernel: the same pairs with the two levers off by default, the warm-up steps in the default only;
      # call y ran ab_fp8inputgrad, the pair of ab_bf16inputgrad with float8 as the lever
      n=16; [ -n "${AB_STEPS:-}" ] && n=$AB_STEPS
      step 400 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps $n --warm 2 --no-gc --ab ${run#ab_} --label "$run" ;;
    bins_nogc_repkv)  # bins_nogc with k/v repeated for varlen_attn, as before attention.FlashGqa (lever repeatkv; calls
      # 2026-11-29 a-d ran it with keep_unrepeated's hooks, which kept the shared heads only for the backward)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --lever repeatkv --label "$run" ;;
    bins_nogc_torchdrop)  # bins_nogc with PyTorch's dropout in the fused backward (the default before 2026-11-28 23:00)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --torch-dropout --label "$run" ;;
    fp8check)  # bench/fp8_rows_check.py: the float8 row kernel against its reference, float8 against bf16 GEMMs
      step 200 "$run" python3 bench/fp8_rows_check.py ;;
    bins_nogc_hf)  # bins_nogc with the Trainer's own NaN filter and token count (host syncs every micro batch)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --hf-loop --label "$run" ;;
    bins_nogc_prof|bins_nogc_hf_prof)  # one optimizer step through the Trainer under torch.profiler (bench/trainer_profile.py)
      f=""; [ $run = bins_nogc_hf_prof ] && f=--hf-loop
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 2 --warm 2 --no-gc --profile $f --label "$run" ;;
    bins_nogc_lead|bins_nogc_defer_lead)  # bins_nogc with bench/host_lead.py: the GPU's lead over the host at each forward,
      # backward, optimizer step and decoder layer (_defer: with the NaN flags read a step late, lever deferdivergence)
      f=""; [ $run = bins_nogc_defer_lead ] && f="--lever deferdivergence"
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --host-lead $f --label "$run" ;;
    bins_nogc_pyspy)  # bins_nogc under py-spy (carried in .whlspy/): where the host's time goes, every thread, as
      # collapsed stacks in $OUT/pyspy.txt (bench/pyspy_summary.py reads them)
      [ -x /tmp/spy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/spy .whlspy/*.whl
      step 300 "$run" /tmp/spy/bin/py-spy record --format raw --rate 200 --threads --idle --nonblocking -o "$OUT/pyspy.txt" -- \
        $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --label "$run" ;;
    bins_nogc_dropout0)  # bins_nogc with LoRA dropout 0, as Unsloth's best (unsloth0) runs
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --dropout 0 --label "$run" ;;
    bins_nogc_before)  # bins_nogc as the default path was before 2026-11-28 22:30: the down projection's input
      # kept (no medtune.lean_mlp) and k/v kept repeated to every query head (no attention.keep_unrepeated)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --before-lean --label "$run" ;;
    bins_nogc_fwd)  # bins_nogc with the fused LoRA forward alone (the default before 2026-11-28 19:40)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --forward-only --label "$run" ;;
    bins_nogc_fbw)  # bins_nogc with the fused LoRA backward (medtune.fast_lora.install(backward=True))
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --fused-backward --label "$run" ;;
    bins_gc_fbw)  # bins_gc with the fused LoRA backward
      step 300 "$run" $GT --quantization 4bit --tokens 16384 --grad-accum 2 --steps 6 --warm 2 --fused-backward --label "$run" ;;
    bins_nogc4k|bins_nogc4k_fbw)  # QLoRA, 4096-token bins x GA 8, no recompute (_fbw: the fused LoRA backward)
      f=""; [ $run = bins_nogc4k_fbw ] && f=--fused-backward
      step 300 "$run" $GT --quantization 4bit --tokens 4096 --grad-accum 8 --steps 6 --warm 2 --no-gc $f --label "$run" ;;
    bins_partial2)  # QLoRA, 8,192-token bins x GA 4, recompute one layer in two (what `auto` picks on a 48 GB card)
      step 300 "$run" $GT --quantization 4bit --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --recompute-every 2 --label "$run" ;;
    bins_bf16_nogc)  # bf16 LoRA, 8192-token bins x GA 4, no recompute
      step 300 "$run" $GT --quantization none --tokens 8192 --grad-accum 4 --steps 6 --warm 2 --no-gc --label "$run" ;;
    fsdp_test)  # tests/integration/test_distributed.py::test_fsdp_two_gpus_match_one on 2 real GPUs
      step 500 "$run" python3 -m pytest -q -p no:cacheprovider tests/integration/test_distributed.py -k fsdp_two_gpus \
        -o addopts="" --rootdir . ;
      tail -1 "$T/fsdp_test.out" | python3 -c 'import json, sys; print(json.dumps({"run": "fsdp_test", "pytest": sys.stdin.read().strip()}))' \
        | tee -a "$OUT/results.jsonl" ;;
    losscheck|losscheck_nogc|losscheck_fp8bwd|losscheck_fp8fwd|losscheck_fp8grp|losscheck_fp8o|losscheck_fp8mlp|losscheck_groupgrad)  # the fast path vs the plain PEFT
      # path, 20 steps, same rows and seed (_nogc: the fast path without recompute, as the presets train on an 80 GB+
      # card; recompute does not change the loss; _fp8bwd: that with the input-gradient GEMMs in float8; _fp8fwd: the
      # forward's too; _fp8grp: the forward's of q/k/v and gate/up)
      case $run in losscheck_nogc) f=--no-gc ;; losscheck_fp8bwd) f="--no-gc --fp8-backward" ;;
        losscheck_fp8fwd) f="--no-gc --lever fp8forward" ;; losscheck_fp8grp) f="--no-gc --lever fp8groups" ;;
        losscheck_fp8o) f="--no-gc --lever fp8witho" ;; losscheck_fp8mlp) f="--no-gc --lever fp8mlp" ;;
        losscheck_groupgrad) f="--no-gc --lever groupgrad" ;; *) f="" ;; esac
      step 300 fast20 $GT --quantization 4bit --packing --micro-batch 26 --grad-accum 1 --steps 20 --warm 0 $f --label fast20
      step 400 plain20 $GT --quantization 4bit --micro-batch 26 --grad-accum 1 --steps 20 --warm 0 --plain --label plain20
      python3 bench/loss_agreement.py "$T/fast20.out" "$T/plain20.out" | tee -a "$OUT/results.jsonl" ;;
    lossmulti)  # losscheck for several levers against one plain PEFT run: LEVER_SETS="groupqkv
      # fp8witho+groupqkv" (each set's levers joined by +), the fast path without recompute for each
      for set in ${LEVER_SETS:-groupgrad}; do
        f="--no-gc"; for l in ${set//+/ }; do f="$f --lever $l"; done
        step 300 "fast20_$set" $GT --quantization 4bit --packing --micro-batch 26 --grad-accum 1 --steps 20 --warm 0 $f --label "fast20_$set"
      done
      step 400 plain20 $GT --quantization 4bit --micro-batch 26 --grad-accum 1 --steps 20 --warm 0 --plain --label plain20
      for set in ${LEVER_SETS:-groupgrad}; do
        python3 bench/loss_agreement.py "$T/fast20_$set.out" "$T/plain20.out" | sed "s/^{/{\"levers\": \"$set\", /" \
          | tee -a "$OUT/results.jsonl"
      done ;;
    e2e)  # `medtune run --preset llama3-8b-medical-quick` on the random 8B folder and 500 real rows
      rm -rf /tmp/e2e
      start=$(date +%s.%N)
      timeout 540 python3 -m medtune run --preset llama3-8b-medical-quick --run-id quick \
        --set model.model_source=local --set model.local_model_path=$M \
        --set dataset.dataset_source=local --set dataset.local_dataset_path=$PWD/.bench/medical_600.jsonl \
        --set output.output_root=/tmp/e2e ${E2E_SET:-} > /tmp/e2e.out 2> /tmp/e2e.err
      rc=$?; end=$(date +%s.%N)
      python3 bench/stage_times.py /tmp/e2e/medical-finetune-quick "$rc" "$start" "$end" | tee -a "$OUT/results.jsonl"
      [ $rc -eq 0 ] || tail -30 /tmp/e2e.err >&2
      cp /tmp/e2e/medical-finetune-quick/summary.md /tmp/e2e/medical-finetune-quick/logs/*.log "$OUT/" 2>/dev/null ;;
  esac
done
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
exit 0
