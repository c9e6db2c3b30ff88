#!/usr/bin/env bash
# The wheels bench/run_gpu.sh carries to the device (Python 3.12, x86-64; the device has torch, transformers 5.17,
# accelerate, huggingface_hub, safetensors, tokenizers, pyarrow, pandas, triton, but no network). Run here:
#   bash bench/make_wheels.sh    -> .whl/ (medtune's GPU runs, ~45 MiB), .whl2/ (Unsloth's anchor, ~39 MiB)
# Each folder travels in its own call (with .bench/ from bench/make_bench_dir.py): together they exceed the
# 64 MiB a call carries; Unsloth's call follows a .whl/ call on the same warm machine (../shared/bench/README.md).
set -eu
cd "$(dirname "$0")/.."
py="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64
    --platform manylinux_2_35_x86_64"
rm -rf .whl .whl2
# medtune's own pins (pyproject.toml), and what they need beyond the device's packages
python3 -m pip download -q $py -d .whl bitsandbytes==0.50.2 peft==0.21.2 liger-kernel==0.8.5 datasets==5.2.0 \
  transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5 typer==0.29.2 rich==15.0.0 fsspec==2026.9.0 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 dill==0.4.1 xxhash==4.1.0 \
  multiprocess==0.70.19 shellingham==1.5.4 annotated-doc==0.0.7 markdown-it-py==4.3.0 mdurl==0.1.2
# bitsandbytes' libraries for CUDA 11.x, 12.1 and 12.4 left out of the carried wheel (the device's torch is 2.11+cu130;
# 12.6 and newer kept): 43 -> 27 MiB, so that .whl/, .bench/ and the tree fit the 64 MiB a call carries
zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda11*.so' \
  'bitsandbytes/libbitsandbytes_cuda121.so' 'bitsandbytes/libbitsandbytes_cuda124.so' > /dev/null
# Unsloth's anchor (../shared/bench/README.md), installed apart into /tmp/site2
python3 -m pip download -q $py -d .whl2 unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.4 \
  tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 msgspec==0.22.0 structlog==26.1.0 \
  json5==0.17.3 nest-asyncio==1.6.0 hf-transfer==0.1.9 cut-cross-entropy==25.1.1 torchao==0.18.0
for d in .whl .whl2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
du -sh .whl .whl2
