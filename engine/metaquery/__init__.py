"""MetaQuery (Pan et al. 2025, arXiv 2504.06256) as a second recipe of the engine: a frozen LLM, N learnable
queries after the prompt, a transformer-encoder connector and a diffusion decoder (Stable Diffusion 1.5's UNet or
Sana's transformer) trained with the decoder's own denoising loss on VAE latents precomputed by
`python -m preprocess build --targets vae-latents`. See docs/metaquery.md.

    pretrain_gpt_vision.py --recipe metaquery --data-path BUILD --llm CKPT --decoder SD_DIR ...   (training)
    python -m engine.generate --recipe metaquery --load CKPT --prompt "..." --output OUT          (rendering)

Modules: `config` (flags), `connector`, `decoder` (diffusers directory, noise schedule, sampler), `llm` (where the
frozen LLM comes from), `model` (frozen-LLM conditioning, the trainable head), `data` (samples, CFG dropout,
batches), `trainer`, `generate`.
"""
