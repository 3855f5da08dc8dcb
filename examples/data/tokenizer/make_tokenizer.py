"""Rebuild `tokenizer.model` in this directory: the demo's tiny LLaMA-3-style tokenizer.

It is a tiktoken-format BPE file (the 256 single bytes plus the merges learned
from the short English text below with `engine.tokenizer.tiny.build_tiny_tiktoken`;
asked for 400, the text runs out of pairs after 323).
Loaded as `build_tokenizer("tiktoken", ...)` it gets the 256 LLaMA-3 special
tokens after its ranks, so the `llama3` chat template works with it. The build
is deterministic; tests/test_tokenizer.py checks that the committed file matches.

    python examples/data/tokenizer/make_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from engine.tokenizer.tiny import build_tiny_tiktoken

NUM_MERGES = 400

DEMO_CORPUS = [
    "A caterpillar eats leaves all summer, then spins a chrysalis and waits.",
    "Inside the chrysalis the caterpillar turns into a butterfly with bright wings.",
    "The user shows the assistant a picture and asks what is in the image.",
    "The assistant looks at the image and describes it in a short answer.",
    "What color is the butterfly? The butterfly is orange and black.",
    "Describe the picture. There is a red flower in a green field under a blue sky.",
    "Draw a cat sitting on a chair. Here is an image of a cat sitting on a chair.",
    "How many birds are in the tree? I can see three small birds in the tree.",
    "The model reads text and images and can also generate images of its own.",
    "Visual tokens come between the image start and image end markers.",
    "You are a helpful assistant. Answer the question about the image.",
    "Thank you! You are welcome. Is there anything else I can help with?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "One, two, three, four, five: the numbers 10, 20 and 30 are round.",
    "system user assistant",
]


def main() -> None:
    """Write tokenizer.model next to this script."""
    path = build_tiny_tiktoken(DEMO_CORPUS, Path(__file__).parent, num_merges=NUM_MERGES)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
