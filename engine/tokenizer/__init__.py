"""Tokenizers and chat templates for Chrysalis.

`build_tokenizer(kind, path)` wraps a SentencePiece, tiktoken (LLaMA-3) or
Hugging Face tokenizer and appends the VPiT image tokens; `chat` turns
conversations with images into tokens and loss masks. Only the standard library
is imported here; each backend is imported when its wrapper is built.
"""

from engine.tokenizer.base import (
    IMAGE_END_PIECE,
    IMAGE_START_PIECE,
    ChrysalisTokenizer,
    TokenizerFormatError,
)
from engine.tokenizer.chat import (
    CHAT_TEMPLATES,
    IMAGE_PLACEHOLDER,
    EncodedConversation,
    ImageSpan,
    Turn,
    encode_conversation,
    encode_generation_prompt,
    stop_token_ids,
)
from engine.tokenizer.loading import TOKENIZER_TYPES, build_tokenizer, load_saved_tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "IMAGE_END_PIECE",
    "IMAGE_PLACEHOLDER",
    "IMAGE_START_PIECE",
    "TOKENIZER_TYPES",
    "ChrysalisTokenizer",
    "EncodedConversation",
    "ImageSpan",
    "TokenizerFormatError",
    "Turn",
    "build_tokenizer",
    "encode_conversation",
    "encode_generation_prompt",
    "load_saved_tokenizer",
    "stop_token_ids",
]
