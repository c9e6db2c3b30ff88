#!/usr/bin/env bash
# Stages FlashAttention 4 (flash_attn.cute) and its CuTe DSL compiler for bench/fa4_check.py on the device, in two
# git-ignored folders, each under the 64 MiB a call carries: the compiler's CUDA 13 library wheel alone is 92 MB,
# so it travels split in two parts, one per folder, and bench/run_gpu.sh (RUNS=fa4stage, twice, then fa4check)
# joins them there. Run here, where PyPI is reachable:
#   bash bench/make_fa4_wheels.sh   -> .whlfa4a/ (part 0 + the small wheels), .whlfa4b/ (part 1 + cuda-bindings)
set -eu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
py="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64"
python3 -m pip download -q $py --pre -d "$tmp" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 einops==0.8.1 \
  "cuda-bindings==13.5.0" cuda-pathfinder==1.9.1 protobuf==7.36.2
rm -rf .whlfa4a .whlfa4b
mkdir -p .whlfa4a .whlfa4b
big=$(cd "$tmp" && ls nvidia_cutlass_dsl_libs_cu13-*.whl)
split -n 2 -d -a 1 "$tmp/$big" "$tmp/$big.part"  # two equal parts; with the tree each folder fits a call
mv "$tmp/$big.part0" .whlfa4a/
mv "$tmp/$big.part1" "$tmp"/cuda_bindings-*.whl .whlfa4b/
rm "$tmp/$big"
mv "$tmp"/*.whl .whlfa4a/
rmdir "$tmp"
grep -qx '/.whlfa4a/' .git/info/exclude || printf '/.whlfa4a/\n/.whlfa4b/\n' >> .git/info/exclude
du -sh .whlfa4a .whlfa4b
