# Chrysalis on NVIDIA's NGC PyTorch container: CUDA, NCCL, PyTorch, Transformer Engine, apex, flash-attn and DALI
# come with the base image; we add only our package and its light dependencies, never a second torch.
#
#   docker build -t chrysalis .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data chrysalis \
#       torchrun --nproc-per-node 8 pretrain_gpt_vision.py --data-path /data/shards ...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/chrysalis
# Dependencies first, so code edits do not invalidate this layer.
COPY setup.py pyproject.toml README.md ./
COPY engine/__init__.py engine/__init__.py
RUN pip install --no-cache-dir "megatron-core>=0.16" safetensors pyyaml sentencepiece tiktoken tokenizers \
        "transformers>=4.45" "diffusers>=0.30" mpi4py pillow tqdm tensorboard torchao

COPY . .
# --no-deps: keep the container's own torch, TE, apex, flash-attn and DALI.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && python -c "import engine, engine.model, chrysalis_kernels.registry as r; print(r.available_backends())"

CMD ["bash"]
