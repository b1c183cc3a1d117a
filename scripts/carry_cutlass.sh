#!/usr/bin/env bash
# Puts the CUTLASS/CuTe headers of the pinned nvidia-cutlass wheel in .carry/cutlass/include
# (git-ignored), for the GPU machine, which has no network. Run here, before the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
pin=$(grep -o 'nvidia-cutlass==[0-9.]*' pyproject.toml)
[ -f .carry/cutlass/include/cute/tensor.hpp ] && [ "$(cat .carry/cutlass/VERSION 2>/dev/null)" = "$pin" ] && exit 0
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps "$pin" -d "$tmp"
rm -rf .carry/cutlass && mkdir -p .carry/cutlass
python3 -m zipfile -e "$tmp"/nvidia_cutlass-*.whl "$tmp/x"
mv "$tmp/x/cutlass_library/source/include" .carry/cutlass/include
echo "$pin" > .carry/cutlass/VERSION
rm -rf "$tmp"
echo "CUTLASS headers ($pin) in .carry/cutlass/include"
