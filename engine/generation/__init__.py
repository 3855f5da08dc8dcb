"""Generation of text and visual tokens from a VPiT model (see `engine.generate` for the command line)."""

from engine.generation.decode import GenerationResult, PromptTokens, SamplingConfig, VPiTGenerator
from engine.generation.loading import (
    LoadedCheckpoint,
    build_prompt_encoder,
    default_chat_template,
    load_checkpoint_for_generation,
)
from engine.generation.prompts import PromptInput, encode_images, encode_prompt, prompt_turns, read_batch_file

__all__ = [
    "GenerationResult",
    "LoadedCheckpoint",
    "PromptInput",
    "PromptTokens",
    "SamplingConfig",
    "VPiTGenerator",
    "build_prompt_encoder",
    "default_chat_template",
    "encode_images",
    "encode_prompt",
    "load_checkpoint_for_generation",
    "prompt_turns",
    "read_batch_file",
]
