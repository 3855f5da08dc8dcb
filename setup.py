"""Chrysalis: a Megatron-style pretraining engine for Visual-Predictive Instruction Tuning (VPiT)."""

from setuptools import find_packages, setup

# The user's layout keeps Triton kernels in `kernels/`. Installing that directory under the import name
# `kernels` would overwrite Hugging Face's well-known `kernels` distribution (and `transformers` probes for
# it), so it is installed as `chrysalis_kernels`. The source folder has no `__init__.py`: from the repo
# root it is at most a namespace portion, which never shadows a real `kernels` package and which
# transformers' probe reports as absent (see tests/test_packaging.py).
PACKAGES = find_packages(include=["engine", "engine.*", "preprocess", "preprocess.*"]) + ["chrysalis_kernels"]

EXTRAS = {
    # Everything the CPU test suite exercises (MPI's runtime comes from the system: see .ci/run).
    "dev": ["pytest>=8", "pytest-timeout", "transformers>=4.45", "sentencepiece", "tiktoken", "tokenizers",
            "scikit-image", "pillow", "tqdm", "tensorboard", "matplotlib", "diffusers>=0.32", "mpi4py",
            # chrysalis_kernels' tests run the Triton kernels on CPU under its interpreter (TRITON_INTERPRET=1).
            "triton>=3.9",
            # FP8 module conversion and its CPU emulation tests (tests/test_training_fast_paths.py).
            "torchao>=0.18,<0.19"],
    "data": ["transformers>=4.45", "mpi4py", "pillow", "sentencepiece", "tiktoken", "tokenizers", "tqdm"],
    # NVIDIA DALI image decoding for `preprocess` (CPU operators, or nvJPEG on a GPU); a 424 MB wheel from the
    # package registry. Without it the PIL decoder is used.
    "dali": ["nvidia-dali-cuda120>=2.4"],
    "train": ["tensorboard", "matplotlib"],
    "gpu": ["transformer-engine[pytorch]", "flash-attn", "torchao>=0.18,<0.19"],
    # torchao float8 training (--fp8-format); 0.18 is built against torch 2.13 and does not pull another torch.
    "fp8": ["torchao>=0.18,<0.19"],
    "viz": ["diffusers>=0.30", "transformers>=4.45", "pillow"],
    # --recipe metaquery: SanaTransformer2DModel, flow-sigma DPM-Solver and FlowMatchEuler sigmas need diffusers 0.32
    "metaquery": ["diffusers>=0.32", "transformers>=4.45", "pillow"],
    "wandb": ["wandb"],
}

setup(
    name="chrysalis",
    version="0.1.0",
    description="High-throughput VPiT (MetaMorph) pretraining engine for LLaMA on PyTorch-native parallelism",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"chrysalis_kernels": "kernels"},
    py_modules=["pretrain_gpt_vision"],
    include_package_data=True,
    package_data={"engine": ["assets/*", "assets/**/*"]},
    # torch is pinned by the README's commands (a local CPU wheel); a range here installs nothing extra.
    install_requires=["torch>=2.6", "numpy", "safetensors", "pyyaml", "megatron-core>=0.16"],
    extras_require=EXTRAS,
)
