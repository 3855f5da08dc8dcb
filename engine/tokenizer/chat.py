"""Chat templates: turning a conversation with images into tokens and a loss mask.

Two templates:

`llama3` (Meta's LLaMA-3 chat format; needs the LLaMA-3 special tokens)::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>   (per turn)

`plain` (any tokenizer)::

    BOS                                   (only if the tokenizer has one)
    "{Role}: " {content} "\\n"            system / user turns, Role = System / User
    "Assistant: " {content} EOS "\\n"     assistant turns

Content is stripped of surrounding whitespace (as Meta's `ChatFormat` and the
Hugging Face LLaMA-3 template do). Each piece of template text (the role name,
"\\n\\n", "{Role}: ", "\\n") and each piece of content between `<image>`
placeholders is encoded separately, so BPE merges never cross those boundaries:
text next to an image is tokenized as if the image were the start/end of the
text. Pieces after the first are encoded with `encode_continuation`, which for
SentencePiece leaves out the dummy-prefix space. Training and generation
prompts are built the same way, so a generation prompt is exactly the prefix
the model saw before the reply during training.

Each `<image>` in content becomes `<image_start>`, `tokens_per_image` slot
positions holding `image_start_id` as a placeholder (the model overwrites them
with visual embeddings), and `<image_end>`.

Loss mask (1 = this token is a training target, predicted from the position
before it): assistant content, the assistant turn's end token (`<|eot_id|>` /
EOS) and every `<image_start>`, slot and `<image_end>` of images inside
assistant turns. Everything else is 0: BOS, headers and role prefixes, system
and user turns (their images included), and plain's "\\n" after EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from engine.tokenizer.base import ChrysalisTokenizer

IMAGE_PLACEHOLDER = "<image>"
CHAT_TEMPLATES = ("llama3", "plain")

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")
_PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation.

    Args:
        role: Who speaks.
        content: The text; each literal `<image>` marks where an image goes.
    """

    role: Role
    content: str


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's slots sit in an encoded conversation.

    Args:
        image_index: Which `<image>` of the conversation this is, counting from 0
            in order across all turns.
        slot_start: Offset of the first slot token (the `<image_start>` token is at
            slot_start - 1, `<image_end>` at slot_start + tokens_per_image).
        is_response: True for images inside assistant turns (generation targets).
    """

    image_index: int
    slot_start: int
    is_response: bool


@dataclass
class EncodedConversation:
    """A tokenized conversation.

    Args:
        tokens: Token ids.
        loss_mask: Same length as tokens; 1 where the token is a training target.
        images: One span per `<image>`, in order.
        turn_starts: Offset where each given turn begins (its header / role prefix).
            The BOS and, for generation prompts, the trailing assistant header are
            not turns.
    """

    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    images: list[ImageSpan] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)


class _ConversationBuilder:
    """Accumulates tokens, loss mask and image spans for one conversation."""

    def __init__(self, tokenizer: ChrysalisTokenizer, tokens_per_image: int) -> None:
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.result = EncodedConversation()
        # Whether no text has been encoded yet; later pieces continue that text.
        self.at_text_start = True

    def add_ids(self, ids: Sequence[int], is_target: bool) -> None:
        self.result.tokens.extend(ids)
        self.result.loss_mask.extend([int(is_target)] * len(ids))

    def add_text(self, text: str, is_target: bool) -> None:
        if self.at_text_start:
            ids = self.tokenizer.encode(text)
        else:
            ids = self.tokenizer.encode_continuation(text)
        self.at_text_start = False
        self.add_ids(ids, is_target)

    def add_content(self, content: str, is_response: bool) -> None:
        """Add message content, expanding each `<image>` into image tokens."""
        text_pieces = content.split(IMAGE_PLACEHOLDER)
        for piece_index, text in enumerate(text_pieces):
            if piece_index > 0:
                self.add_image(is_response)
            if text:
                self.add_text(text, is_response)

    def add_image(self, is_response: bool) -> None:
        tokenizer = self.tokenizer
        self.add_ids([tokenizer.image_start_id], is_response)
        span = ImageSpan(
            image_index=len(self.result.images),
            slot_start=len(self.result.tokens),
            is_response=is_response,
        )
        self.result.images.append(span)
        self.add_ids([tokenizer.image_start_id] * self.tokens_per_image, is_response)
        self.add_ids([tokenizer.image_end_id], is_response)

    def mark_turn_start(self) -> None:
        self.result.turn_starts.append(len(self.result.tokens))


def _check_arguments(
    turns: Sequence[Turn], tokenizer: ChrysalisTokenizer, template: str, tokens_per_image: int
) -> None:
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {list(CHAT_TEMPLATES)}")
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be at least 1, got {tokens_per_image}")
    for index, turn in enumerate(turns):
        if turn.role not in _ROLES:
            raise ValueError(f"turn {index} has role {turn.role!r}; expected one of {list(_ROLES)}")
    if template == "llama3":
        for piece in _LLAMA3_TOKENS:
            if not tokenizer.has_special_token(piece):
                raise ValueError(
                    f"chat template 'llama3' needs the special token {piece!r}, which the "
                    f"{tokenizer.kind} tokenizer {tokenizer.files[0]} does not have; use "
                    "--chat-template plain for this tokenizer"
                )


def _add_llama3_header(builder: _ConversationBuilder, role: str) -> None:
    tokenizer = builder.tokenizer
    builder.add_ids([tokenizer.special_token_id("<|start_header_id|>")], is_target=False)
    builder.add_text(role, is_target=False)
    builder.add_ids([tokenizer.special_token_id("<|end_header_id|>")], is_target=False)
    builder.add_text("\n\n", is_target=False)


def _build(
    turns: Sequence[Turn],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int,
    add_generation_prompt: bool,
) -> EncodedConversation:
    _check_arguments(turns, tokenizer, template, tokens_per_image)
    builder = _ConversationBuilder(tokenizer, tokens_per_image)
    if template == "llama3":
        builder.add_ids([tokenizer.special_token_id("<|begin_of_text|>")], is_target=False)
        eot_id = tokenizer.special_token_id("<|eot_id|>")
        for turn in turns:
            is_response = turn.role == "assistant"
            builder.mark_turn_start()
            _add_llama3_header(builder, turn.role)
            builder.add_content(turn.content.strip(), is_response)
            builder.add_ids([eot_id], is_target=is_response)
        if add_generation_prompt:
            _add_llama3_header(builder, "assistant")
    else:
        if tokenizer.bos_id is not None:
            builder.add_ids([tokenizer.bos_id], is_target=False)
        for turn in turns:
            is_response = turn.role == "assistant"
            builder.mark_turn_start()
            builder.add_text(f"{_PLAIN_ROLE_NAMES[turn.role]}: ", is_target=False)
            builder.add_content(turn.content.strip(), is_response)
            if is_response:
                builder.add_ids([tokenizer.eos_id], is_target=True)
            builder.add_text("\n", is_target=False)
        if add_generation_prompt:
            builder.add_text(f"{_PLAIN_ROLE_NAMES['assistant']}: ", is_target=False)
    return builder.result


def encode_conversation(
    turns: Sequence[Turn],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int = 64,
) -> EncodedConversation:
    """Encode a whole conversation for training.

    Args:
        turns: The messages, in order.
        tokenizer: Any Chrysalis tokenizer (`llama3` needs the LLaMA-3 specials).
        template: "llama3" or "plain" (formats in the module docstring).
        tokens_per_image: Slot positions per `<image>`.

    Raises:
        ValueError: for an unknown template or role, tokens_per_image < 1, or a
            tokenizer lacking a special token the template needs.
    """
    return _build(turns, tokenizer, template, tokens_per_image, add_generation_prompt=False)


def encode_generation_prompt(
    turns: Sequence[Turn],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int = 64,
) -> EncodedConversation:
    """Encode the conversation so far, ending where the assistant's reply begins.

    The tokens are those of `encode_conversation(turns, ...)` followed by the
    assistant header (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`
    for llama3, "Assistant: " for plain), so a model trained on
    `encode_conversation` output sees the same prefix at generation time.

    Args:
        turns: The messages so far (usually ending with a user turn).
        tokenizer: As for `encode_conversation`.
        template: "llama3" or "plain".
        tokens_per_image: Slot positions per `<image>`.
    """
    return _build(turns, tokenizer, template, tokens_per_image, add_generation_prompt=True)


def stop_token_ids(tokenizer: ChrysalisTokenizer, template: str) -> set[int]:
    """Ids that end an assistant reply under `template`.

    llama3 stops on `<|eot_id|>` and also on EOS (as Meta's tokenizer does);
    plain stops on EOS.
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {list(CHAT_TEMPLATES)}")
    if template == "llama3":
        _check_arguments([], tokenizer, template, tokens_per_image=1)
        return {tokenizer.special_token_id("<|eot_id|>"), tokenizer.eos_id}
    return {tokenizer.eos_id}
