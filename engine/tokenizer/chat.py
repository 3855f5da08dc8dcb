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

Only the calls are shared, never the pieces: the ids of the template text are
cached per tokenizer, and the content pieces of one conversation (or, through
`encode_conversations`, of many) go to the tokenizer's batch method in one call.
The ids are exactly those of one `encode` call per piece (tested against that).

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

import weakref
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


# Token ids of the template's own text pieces ("User: ", "\n", role names, ...), per tokenizer and per
# (text, at_text_start): they are the same in every conversation, so each is encoded once per process.
_TEMPLATE_PIECE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template_piece_ids(tokenizer: ChrysalisTokenizer, text: str, at_text_start: bool) -> list[int]:
    cache = _TEMPLATE_PIECE_IDS.setdefault(tokenizer, {})
    key = (text, at_text_start)
    ids = cache.get(key)
    if ids is None:
        ids = tokenizer.encode(text) if at_text_start else tokenizer.encode_continuation(text)
        cache[key] = ids
    return ids


def _encode_content_pieces(tokenizer: ChrysalisTokenizer, texts: list[str]) -> list[list[int]]:
    """`encode_continuation` of every text, in one call where the backend has a batch method."""
    batch = getattr(tokenizer, "encode_continuation_batch", None)
    if batch is not None:
        return batch(texts)
    return [tokenizer.encode_continuation(text) for text in texts]


# A planned conversation is a list of parts, each (kind, value, is_target):
#   _IDS   value = ids known already (special tokens, cached template text, image blocks)
#   _TEXT  value = index into the list of content pieces encoded in one batch afterwards
#   _IMAGE value = None (an image block; its span is recorded when the parts are assembled)
_IDS, _TEXT, _IMAGE = 0, 1, 2


class _ConversationPlanner:
    """Lays out one conversation as parts; content text is collected for one batched encode.

    Each piece of template text and each piece of content between `<image>` placeholders is still encoded
    on its own (BPE merges never cross those boundaries); only the calls into the tokenizer are batched.
    The first text piece of a conversation is encoded with `encode`, every later one with
    `encode_continuation` (they differ for SentencePiece only).
    """

    def __init__(self, tokenizer: ChrysalisTokenizer, content_texts: list[str]) -> None:
        self.tokenizer = tokenizer
        self.content_texts = content_texts  # shared by every conversation of one batch
        self.parts: list[tuple[int, object, bool]] = []
        self.turn_parts: list[int] = []  # index into parts where each turn starts
        self.at_text_start = True

    def add_ids(self, ids: Sequence[int], is_target: bool) -> None:
        self.parts.append((_IDS, ids, is_target))

    def add_template_text(self, text: str, is_target: bool) -> None:
        self.parts.append((_IDS, _template_piece_ids(self.tokenizer, text, self.at_text_start), is_target))
        self.at_text_start = False

    def add_content(self, content: str, is_response: bool) -> None:
        """Add message content, expanding each `<image>` into an image block."""
        for piece_index, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if piece_index > 0:
                self.parts.append((_IMAGE, None, is_response))
            if text:
                if self.at_text_start:  # no template text before it (no template does this today)
                    self.parts.append((_IDS, self.tokenizer.encode(text), is_response))
                    self.at_text_start = False
                else:
                    self.parts.append((_TEXT, len(self.content_texts), is_response))
                    self.content_texts.append(text)

    def mark_turn_start(self) -> None:
        self.turn_parts.append(len(self.parts))


def _assemble(planner: _ConversationPlanner, content_ids: list[list[int]], tokenizer: ChrysalisTokenizer,
              tokens_per_image: int) -> EncodedConversation:
    result = EncodedConversation()
    tokens, loss_mask = result.tokens, result.loss_mask
    turn_parts = planner.turn_parts
    next_turn = 0
    image_block = [tokenizer.image_start_id] * (tokens_per_image + 1) + [tokenizer.image_end_id]
    for index, (kind, value, is_target) in enumerate(planner.parts):
        while next_turn < len(turn_parts) and turn_parts[next_turn] == index:
            result.turn_starts.append(len(tokens))
            next_turn += 1
        if kind == _TEXT:
            ids = content_ids[value]
        elif kind == _IMAGE:
            result.images.append(ImageSpan(len(result.images), len(tokens) + 1, is_target))
            ids = image_block
        else:
            ids = value
        tokens.extend(ids)
        loss_mask.extend([1 if is_target else 0] * len(ids))
    result.turn_starts.extend([len(tokens)] * (len(turn_parts) - next_turn))  # turns that added no part
    return result


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


def _add_llama3_header(planner: _ConversationPlanner, role: str) -> None:
    tokenizer = planner.tokenizer
    planner.add_ids([tokenizer.special_token_id("<|start_header_id|>")], is_target=False)
    planner.add_template_text(role, is_target=False)
    planner.add_ids([tokenizer.special_token_id("<|end_header_id|>")], is_target=False)
    planner.add_template_text("\n\n", is_target=False)


def _plan(planner: _ConversationPlanner, turns: Sequence[Turn], template: str, add_generation_prompt: bool) -> None:
    tokenizer = planner.tokenizer
    if template == "llama3":
        planner.add_ids([tokenizer.special_token_id("<|begin_of_text|>")], is_target=False)
        eot_id = [tokenizer.special_token_id("<|eot_id|>")]
        for turn in turns:
            is_response = turn.role == "assistant"
            planner.mark_turn_start()
            _add_llama3_header(planner, turn.role)
            planner.add_content(turn.content.strip(), is_response)
            planner.add_ids(eot_id, is_target=is_response)
        if add_generation_prompt:
            _add_llama3_header(planner, "assistant")
    else:
        if tokenizer.bos_id is not None:
            planner.add_ids([tokenizer.bos_id], is_target=False)
        for turn in turns:
            is_response = turn.role == "assistant"
            planner.mark_turn_start()
            planner.add_template_text(f"{_PLAIN_ROLE_NAMES[turn.role]}: ", is_target=False)
            planner.add_content(turn.content.strip(), is_response)
            if is_response:
                planner.add_ids([tokenizer.eos_id], is_target=True)
            planner.add_template_text("\n", is_target=False)
        if add_generation_prompt:
            planner.add_template_text(f"{_PLAIN_ROLE_NAMES['assistant']}: ", is_target=False)


def _build_many(
    conversations: Sequence[Sequence[Turn]],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int,
    add_generation_prompt: bool,
) -> list[EncodedConversation]:
    if not conversations:
        _check_arguments([], tokenizer, template, tokens_per_image)
    content_texts: list[str] = []
    planners = []
    for turns in conversations:
        _check_arguments(turns, tokenizer, template, tokens_per_image)
        planner = _ConversationPlanner(tokenizer, content_texts)
        _plan(planner, turns, template, add_generation_prompt)
        planners.append(planner)
    content_ids = _encode_content_pieces(tokenizer, content_texts)
    return [_assemble(planner, content_ids, tokenizer, tokens_per_image) for planner in planners]


def _build(
    turns: Sequence[Turn],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int,
    add_generation_prompt: bool,
) -> EncodedConversation:
    return _build_many([turns], tokenizer, template, tokens_per_image, add_generation_prompt)[0]


def encode_conversations(
    conversations: Sequence[Sequence[Turn]],
    tokenizer: ChrysalisTokenizer,
    template: str,
    tokens_per_image: int = 64,
) -> list[EncodedConversation]:
    """`[encode_conversation(turns, ...) for turns in conversations]`, with one batched tokenizer call.

    The ids are exactly those of encoding each conversation alone (every piece is still encoded on its
    own); preprocessing uses this to pay the tokenizer's per-call overhead once per chunk of records.

    Raises:
        ValueError: as `encode_conversation`, for any of the conversations.
    """
    return _build_many(conversations, tokenizer, template, tokens_per_image, add_generation_prompt=False)


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
