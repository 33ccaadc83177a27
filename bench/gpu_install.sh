#!/usr/bin/env bash
# On the device tool's GPU machine: join and install the wheels that bench/gpu_wheels.sh packed into
# .whl/1, .whl/2, ... (each carried by one call) into /tmp/site, beside the image's PyTorch. Then run
#   PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=$(ls .whl/*/MANIFEST 2>/dev/null | head -1)
[ -n "$manifest" ] || { echo "no .whl/N/MANIFEST: run bench/gpu_wheels.sh here first" >&2; exit 2; }
stage=/tmp/gpu-wheels
rm -rf "$stage" && mkdir -p "$stage"
cp .whl/*/*.whl "$stage/" 2>/dev/null || true
for part in .whl/*/*.part-00; do
  [ -e "$part" ] || continue
  wheel=$(basename "${part%.part-00}")
  cat $(ls .whl/*/"$wheel".part-* | sort) >"$stage/$wheel"
done
if ! (cd "$stage" && sha256sum --check --quiet "$OLDPWD/$manifest"); then
  echo "wheels missing or incomplete: carry every .whl/N group, one call each, before this one" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$stage"/*.whl
echo "installed $(ls "$stage" | wc -l) wheels into /tmp/site"
