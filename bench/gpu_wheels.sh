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
  'grpcio-reflection==1.84.0' \
  "$([ "${ORT_GPU:-0}" = 1 ] && echo 'onnxruntime-gpu>=1.18' || echo 'onnxruntime>=1.18')"
# ORT_GPU=1: ONNX Runtime with its CUDA provider (255 MB, five more groups) so that the onnx step
# compares it with PyTorch on the GPU; by default the CPU build (17 MB), and PyTorch serves on the GPU.
# grpcio-reflection must match the image's grpcio (1.84.0, seen 2026-11-30): Serve imports it and a
# newer one refuses to load beside an older grpcio.

# The device image's packages (device tool, KINDS.md, read 2026-11-17; onnx and the CPU onnxruntime
# among them): keep theirs, carry the rest. Matched whole, one name a line.
has="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# SKIP: more names to leave out. SKIP=mlflow (the UI, which the check never opens; mlflow-skinny
# holds the rest) with GROUP_MIB=58 packs everything into two groups, one call fewer.
for wheel in /tmp/gpu-wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
  if tr ' ' '\n' <<<"$has ${SKIP:-}" | grep -qxF -- "$name"; then rm "$wheel"; fi
done
(cd /tmp/gpu-wheels && sha256sum *.whl) >/tmp/gpu-wheels.manifest  # what gpu_install.sh must rebuild

# Parts of at most 40 MB, then groups of at most GROUP_MIB (default 56) MiB: largest first, each into
# the first group with room (the tree travels beside each group within the call's 64 MiB).
(cd /tmp/gpu-wheels && for w in *.whl; do
  if [ "$(stat -c %s "$w")" -gt 40000000 ]; then split -b 40000000 -d "$w" "$w.part-" && rm "$w"; fi
done)
limit=$((${GROUP_MIB:-56} * 1024 * 1024))
declare -a used=()
for f in $(ls -S /tmp/gpu-wheels); do
  s=$(stat -c %s "/tmp/gpu-wheels/$f") g=0
  while [ -n "${used[g]:-}" ] && [ $((used[g] + s)) -gt "$limit" ]; do g=$((g + 1)); done
  used[g]=$((${used[g]:-0} + s))
  mkdir -p "$out/$((g + 1))" && mv "/tmp/gpu-wheels/$f" "$out/$((g + 1))/"
done
group=${#used[@]}
for g in "$out"/*/; do cp /tmp/gpu-wheels.manifest "$g/MANIFEST"; done  # whichever group comes last
echo "$(wc -l </tmp/gpu-wheels.manifest) wheels in $group groups:" && du -sh "$out"/*/
