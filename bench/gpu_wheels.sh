#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on the device tool's GPU machine, prepared here (it reaches no
# package index). That machine's image has Python 3.12 and PyTorch but not Ray, MLflow, pydantic or
# FastAPI; each call to it carries at most 64 MiB, and Ray's wheel alone is 79 MB. So: download what
# our dependencies need for CPython 3.12 on x86-64, drop what the image already has, split wheels over
# 40 MB into parts, and pack everything into groups .whl/1, .whl/2, ... of at most 56 MiB, one group a
# call. bench/gpu_install.sh puts them back together and installs them there. README: Development.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
rm -rf "$out" /tmp/gpu-wheels && mkdir -p "$out" /tmp/gpu-wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d /tmp/gpu-wheels \
  'ray[default,data,train,tune,serve]==2.60.0' 'mlflow-skinny>=3.0,<3.18' 'mlflow>=3.0,<3.18' \
  'pydantic>=2.6' 'fastapi>=0.110' 'uvicorn>=0.29' 'python-multipart>=0.0.9' 'onnx>=1.16' \
  "$([ "${ORT_GPU:-0}" = 1 ] && echo 'onnxruntime-gpu>=1.18' || echo 'onnxruntime>=1.18')"
# ORT_GPU=1: ONNX Runtime with its CUDA provider (255 MB, five more groups) so that the onnx step
# compares it with PyTorch on the GPU; by default the CPU build (17 MB), and PyTorch serves on the GPU.

# The device image's packages (device tool, KINDS.md, read 2026-11-17): keep theirs, carry the rest.
has="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec
grpcio h11 httpcore httpx idna imageio jinja2 joblib kiwisolver markdown markupsafe matplotlib msgpack
multidict networkx numpy opencv-python-headless packaging pandas pillow prometheus-client propcache
protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich scikit-learn scipy
setuptools six sympy threadpoolctl torch tqdm typing-extensions urllib3 werkzeug wrapt yarl zipp"
for wheel in /tmp/gpu-wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
  if grep -qw -- "$name" <<<"$has"; then rm "$wheel"; fi
done
(cd /tmp/gpu-wheels && sha256sum *.whl) >/tmp/gpu-wheels.manifest  # what gpu_install.sh must rebuild

# Parts of at most 40 MB, then greedy groups of at most 56 MiB.
(cd /tmp/gpu-wheels && for w in *.whl; do
  if [ "$(stat -c %s "$w")" -gt 40000000 ]; then split -b 40000000 -d "$w" "$w.part-" && rm "$w"; fi
done)
group=1 size=0 limit=$((56 * 1024 * 1024))
mkdir -p "$out/$group"
for f in $(ls -S /tmp/gpu-wheels); do
  s=$(stat -c %s "/tmp/gpu-wheels/$f")
  if [ $((size + s)) -gt "$limit" ]; then group=$((group + 1)) size=0 && mkdir -p "$out/$group"; fi
  mv "/tmp/gpu-wheels/$f" "$out/$group/" && size=$((size + s))
done
for g in "$out"/*/; do cp /tmp/gpu-wheels.manifest "$g/MANIFEST"; done  # whichever group comes last
echo "$(wc -l </tmp/gpu-wheels.manifest) wheels in $group groups:" && du -sh "$out"/*/
