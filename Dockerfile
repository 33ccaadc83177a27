# syntax=docker/dockerfile:1
# One image for every node of a hotdog-ray cluster: Ray head, CPU and GPU workers (cluster launcher
# and KubeRay alike), the RayJob drivers, Serve replicas, and the MLflow tracking server.
#
#   docker build -t hotdog-ray:0.1.0 .                                       # CUDA base, GPU nodes
#   docker build --build-arg RAY_IMAGE_VARIANT=py311-cpu \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t hotdog-ray:0.1.0-cpu .
#
# RAY_VERSION must equal the ray pin in pyproject.toml (tests/test_deploy.py checks it): a Ray
# client and cluster of different versions refuse to talk.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_VARIANT=py311-gpu
FROM rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_VARIANT}

# Where torch wheels come from: PyPI's default Linux wheels are CUDA builds (right for the GPU
# base); the CPU variant points this at PyTorch's CPU index and saves gigabytes.
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_DATA_DISABLE_PROGRESS_BARS=1

# The base image's user `ray`, by number so that Kubernetes can check runAsNonRoot against it.
USER 1000:100
# Jobs are submitted without a working_dir (a RayJob cannot upload one): the head's `ray start`
# runs here, so `python jobs/train.py --config configs/...` resolves against this folder.
WORKDIR /home/ray/app

# Dependencies first, in their own layer, so a code change does not reinstall torch.
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['optuna'] + p['optional-dependencies']['server']))" \
        > /tmp/requirements.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=ray:users hotdog_ray ./hotdog_ray
RUN pip install --no-deps .

COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users serving ./serving

# Smoke check at build time: the package imports and the CLI runs.
RUN hotdog --help > /dev/null
