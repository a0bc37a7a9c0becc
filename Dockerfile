# syntax=docker/dockerfile:1
# neoxq images, built from this repository:
#
#   docker build --target api    -t neoxq-api .     # API, migrations, CLI client: no torch
#   docker build --target worker -t neoxq-worker .  # GPU worker: CUDA torch + neoxq
#
# The API image never installs torch (the API never imports it; docs/ARCHITECTURE.md), which keeps
# it around 300 MB instead of several GB. The worker starts from a PyTorch CUDA runtime
# image so the GPU stack (CUDA, cuDNN, NCCL) comes as PyTorch built and tested it; pick
# another with --build-arg TORCH_IMAGE=... (neoxq accepts torch >=2.4,<2.15).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------- src
# The project's sources once, for both images (tests, docs and local state stay out).
FROM scratch AS src
WORKDIR /app
COPY pyproject.toml README.md ./
COPY specs specs
COPY core core
COPY store store
COPY api api
COPY cli cli
COPY migrations migrations
COPY models models
COPY worker worker
COPY evals evals
COPY train train
COPY trainer trainer
COPY bench bench
COPY assets assets

# ---------------------------------------------------------------------------- api
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NEOXQ_DATA_DIR=/data
WORKDIR /app
# Dependencies first (cached layer), then the code. They are the light install's, read from
# pyproject.toml (one list): the API, store, migrations and client, no torch.
COPY --from=src /app/pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))\
['project']['dependencies']))" > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY --from=src /app ./
RUN pip install --no-deps . && useradd --create-home --uid 1000 neoxq \
    && mkdir -p /data && chown neoxq /data
USER neoxq
EXPOSE 8000
# Bound on every interface, but until an API key exists only loopback clients (inside the
# container) are answered; `docker compose exec api neoxq keys create admin` opens it to
# other hosts, with keys, without a restart.
CMD ["neoxq", "api", "--host", "0.0.0.0", "--port", "8000", "--no-upgrade"]

# ---------------------------------------------------------------------------- worker
FROM ${TORCH_IMAGE} AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NEOXQ_DATA_DIR=/data
WORKDIR /app
COPY --from=src /app ./
# The image's torch satisfies neoxq's range, so pip keeps it and adds only the rest of the
# worker install.
RUN pip install ".[worker]" && python -c "import torch, models, worker; print(torch.__version__)"
# Prometheus metrics of the worker (NEOXQ_WORKER_METRICS_PORT).
EXPOSE 9100
CMD ["neoxq", "worker", "--model", "/checkpoints"]

# ------------------------------------------------------------------------------ trainer
# `neoxq trainer`: fine-tuning jobs from the API's training queue (the worker image plus
# DeepSpeed and peft).
FROM worker AS trainer
RUN pip install ".[train]" && python -c "import deepspeed, peft, train, trainer"
CMD ["neoxq", "trainer"]
