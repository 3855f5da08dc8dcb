# Chrysalis on NVIDIA's NGC PyTorch container. CUDA, NCCL, PyTorch, Transformer Engine, apex, flash-attn and DALI
# come with the base image; we add our package and its pure-Python dependencies, never a second torch.
#
#   docker build -t chrysalis .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data chrysalis \
#       torchrun --nproc-per-node 8 pretrain_gpt_vision.py --data-path /data/shards ...
#   docker run -v /data:/data chrysalis python -m preprocess build --input /data/train.jsonl ...
#
# The base tag is pinned (override with --build-arg BASE_IMAGE=...); see docs/cluster.md. Our CI has no Docker
# engine, so this file is linted (hadolint) there but never built.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG USER_NAME=chrysalis
ARG USER_UID=1000
ARG USER_GID=1000

# TOKENIZERS_PARALLELISM is a Hugging Face tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    CHRYSALIS_HOME=/opt/chrysalis

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A non-root user. -o: the base image may already use the UID (Ubuntu 24.04 images ship `ubuntu` as 1000);
# pass --build-arg USER_UID=$(id -u) to own files written to bind mounts.
RUN groupadd -o -g "${USER_GID}" "${USER_NAME}" \
 && useradd -o -l -m -u "${USER_UID}" -g "${USER_GID}" -s /bin/bash "${USER_NAME}"

WORKDIR /opt/chrysalis

# Dependencies first (pinned), so that code edits do not invalidate this layer. NGC bases set PIP_CONSTRAINT to
# their own pins, which keeps pip from replacing the base's torch, TE, apex, flash-attn or DALI.
COPY docker/requirements.txt docker/requirements.txt
RUN pip install --no-cache-dir -r docker/requirements.txt "torchao==0.18.0"

COPY --chown=root:root . .
# --no-deps: everything is installed above or comes with the base image.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && python -c "import engine, engine.model, pretrain_gpt_vision, preprocess, chrysalis_kernels.registry as r; print(r.available_backends())" \
 && install -m 0755 docker/entrypoint.sh /usr/local/bin/chrysalis-entrypoint

USER ${USER_NAME}
ENTRYPOINT ["/usr/local/bin/chrysalis-entrypoint"]
CMD []
