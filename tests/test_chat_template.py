"""Tests for the chat templates: exact token sequences, loss masks, image spans,
turn starts, generation prompts and stop tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tokenizer import (
    ChrysalisTokenizer,
    EncodedConversation,
    ImageSpan,
    Turn,
    build_tokenizer,
    encode_conversation,
    encode_generation_prompt,
    stop_token_ids,
)
from engine.tokenizer.tiny import train_tiny_hf_tokenizer, train_tiny_sentencepiece

DEMO_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "examples" / "data" / "tokenizer"
CORPUS = [
    "The user shows a picture and the assistant describes the image in detail.",
    "A cat sits on a red chair. Here is a drawing of a dog. Done!",
] * 5
TOKENS_PER_IMAGE = 3

CONVERSATION = [
    Turn("system", "You are helpful."),
    Turn("user", "<image>\nWhat is this? <|eot_id|>"),
    Turn("assistant", "A cat. Here is a dog: <image> Done!"),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ChrysalisTokenizer]:
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {
        "tiktoken": build_tokenizer("tiktoken", DEMO_TOKENIZER_DIR),
        "huggingface": build_tokenizer("huggingface", train_tiny_hf_tokenizer(CORPUS, root / "hf")),
        "sentencepiece": build_tokenizer("sentencepiece", train_tiny_sentencepiece(CORPUS, root / "sp")),
    }


class _Expected:
    """Hand-assembled expected tokens and loss mask."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.loss_mask: list[int] = []

    def add(self, ids: list[int], target: int) -> None:
        self.tokens += ids
        self.loss_mask += [target] * len(ids)


def _image(tokenizer: ChrysalisTokenizer) -> list[int]:
    return [tokenizer.image_start_id] * (1 + TOKENS_PER_IMAGE) + [tokenizer.image_end_id]


@pytest.mark.parametrize("kind", ["tiktoken", "huggingface"])
def test_llama3_tokens_and_loss_mask_match_hand_built_sequence(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str
) -> None:
    tokenizer = tokenizers[kind]
    special = tokenizer.special_token_id
    bos, start_header, end_header, eot = (
        special("<|begin_of_text|>"),
        special("<|start_header_id|>"),
        special("<|end_header_id|>"),
        special("<|eot_id|>"),
    )
    encode = tokenizer.encode
    expected = _Expected()
    expected.add([bos], 0)
    expected.add([start_header] + encode("system") + [end_header] + encode("\n\n"), 0)
    expected.add(encode("You are helpful.") + [eot], 0)
    expected.add([start_header] + encode("user") + [end_header] + encode("\n\n"), 0)
    # The user's literal "<|eot_id|>" is text, not the special id.
    expected.add(_image(tokenizer) + encode("\nWhat is this? <|eot_id|>") + [eot], 0)
    expected.add([start_header] + encode("assistant") + [end_header] + encode("\n\n"), 0)
    expected.add(encode("A cat. Here is a dog: ") + _image(tokenizer) + encode(" Done!") + [eot], 1)

    encoded = encode_conversation(CONVERSATION, tokenizer, "llama3", tokens_per_image=TOKENS_PER_IMAGE)
    assert encoded.tokens == expected.tokens
    assert encoded.loss_mask == expected.loss_mask
    assert encoded.tokens.count(eot) == len(CONVERSATION)
    assert tokenizer.decode(encoded.tokens) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "<image_start><image_start><image_start><image_start><image_end>\nWhat is this? <|eot_id|><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat. Here is a dog: "
        "<image_start><image_start><image_start><image_start><image_end> Done!<|eot_id|>"
    )


@pytest.mark.parametrize("template", ["llama3", "plain"])
def test_loss_mask_by_region(tokenizers: dict[str, ChrysalisTokenizer], template: str) -> None:
    tokenizer = tokenizers["tiktoken"]
    encoded = encode_conversation(CONVERSATION, tokenizer, template, tokens_per_image=TOKENS_PER_IMAGE)
    prompt_image, response_image = encoded.images
    assert (prompt_image.is_response, response_image.is_response) == (False, True)

    def mask_of(start: int, stop: int) -> list[int]:
        return encoded.loss_mask[start:stop]

    # Prompt image: <image_start>, slots and <image_end> all 0.
    assert mask_of(prompt_image.slot_start - 1, prompt_image.slot_start + TOKENS_PER_IMAGE + 1) == [0] * (
        TOKENS_PER_IMAGE + 2
    )
    # Response image: all 1.
    assert mask_of(response_image.slot_start - 1, response_image.slot_start + TOKENS_PER_IMAGE + 1) == [1] * (
        TOKENS_PER_IMAGE + 2
    )
    system_start, user_start, assistant_start = encoded.turn_starts
    assert encoded.loss_mask[0] == 0  # BOS
    assert set(mask_of(system_start, assistant_start)) == {0}  # system and user turns
    end_token = tokenizer.special_token_id("<|eot_id|>") if template == "llama3" else tokenizer.eos_id
    end_index = max(i for i, token in enumerate(encoded.tokens) if token == end_token)
    assert encoded.loss_mask[end_index] == 1  # the assistant's end token is a target
    assistant_mask = mask_of(assistant_start, end_index + 1)
    header_length = assistant_mask.index(1)
    assert header_length > 0 and set(assistant_mask[header_length:]) == {1}
    assert tokenizer.decode(encoded.tokens[assistant_start + header_length :]).startswith("A cat.")
    if template == "plain":
        # Only the "\n" separator after EOS follows, and it is not a target.
        assert encoded.tokens[end_index + 1 :] == tokenizer.encode("\n")
        assert mask_of(end_index + 1, len(encoded.tokens)) == [0] * len(tokenizer.encode("\n"))
    else:
        assert end_index == len(encoded.tokens) - 1


@pytest.mark.parametrize("template", ["llama3", "plain"])
def test_image_spans_point_at_their_slots(tokenizers: dict[str, ChrysalisTokenizer], template: str) -> None:
    tokenizer = tokenizers["tiktoken"]
    turns = [
        Turn("user", "Compare <image> and <image>."),
        Turn("assistant", "<image>"),
        Turn("user", "Again: <image>"),
    ]
    encoded = encode_conversation(turns, tokenizer, template, tokens_per_image=TOKENS_PER_IMAGE)
    assert [span.image_index for span in encoded.images] == [0, 1, 2, 3]
    assert [span.is_response for span in encoded.images] == [False, False, True, False]
    for span in encoded.images:
        assert encoded.tokens[span.slot_start - 1] == tokenizer.image_start_id
        slots = encoded.tokens[span.slot_start : span.slot_start + TOKENS_PER_IMAGE]
        assert slots == [tokenizer.image_start_id] * TOKENS_PER_IMAGE
        assert encoded.tokens[span.slot_start + TOKENS_PER_IMAGE] == tokenizer.image_end_id
    assert encoded.tokens.count(tokenizer.image_end_id) == 4
    # Spans are ordered and inside the turns they belong to.
    turn_of_image = [0, 0, 1, 2]
    bounds = encoded.turn_starts + [len(encoded.tokens)]
    for span, turn_index in zip(encoded.images, turn_of_image):
        assert bounds[turn_index] < span.slot_start < bounds[turn_index + 1]
    assert len(encoded.tokens) == len(encoded.loss_mask)


def test_image_spans_with_default_tokens_per_image(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    encoded = encode_conversation([Turn("user", "<image>")], tokenizer, "llama3")
    (span,) = encoded.images
    assert span == ImageSpan(image_index=0, slot_start=span.slot_start, is_response=False)
    assert encoded.tokens[span.slot_start + 64] == tokenizer.image_end_id
    assert encoded.tokens.count(tokenizer.image_start_id) == 65


def test_llama3_turn_starts_are_headers(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    encoded = encode_conversation(CONVERSATION, tokenizer, "llama3", tokens_per_image=TOKENS_PER_IMAGE)
    start_header = tokenizer.special_token_id("<|start_header_id|>")
    assert encoded.turn_starts == [i for i, token in enumerate(encoded.tokens) if token == start_header]
    assert encoded.turn_starts[0] == 1  # right after <|begin_of_text|>


@pytest.mark.parametrize("kind", ["tiktoken", "huggingface", "sentencepiece"])
def test_plain_template_exact_format(tokenizers: dict[str, ChrysalisTokenizer], kind: str) -> None:
    tokenizer = tokenizers[kind]
    encoded = encode_conversation(CONVERSATION, tokenizer, "plain", tokens_per_image=TOKENS_PER_IMAGE)
    image_text = "<image_start>" * (TOKENS_PER_IMAGE + 1) + "<image_end>"
    bos_text = tokenizer.decode([tokenizer.bos_id])
    eos_text = tokenizer.decode([tokenizer.eos_id])
    assert tokenizer.decode(encoded.tokens) == (
        f"{bos_text}System: You are helpful.\n"
        f"User: {image_text}\nWhat is this? <|eot_id|>\n"
        f"Assistant: A cat. Here is a dog: {image_text} Done!{eos_text}\n"
    )
    assert encoded.tokens[0] == tokenizer.bos_id
    assert encoded.tokens.count(tokenizer.eos_id) == 1
    for turn_start, role in zip(encoded.turn_starts, ["System", "User", "Assistant"]):
        assert tokenizer.decode(encoded.tokens[turn_start:]).startswith(f"{role}: ")


def test_plain_template_hand_built_tiktoken(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    encode = tokenizer.encode
    turns = [Turn("user", "Hi <image>"), Turn("assistant", " Hello! ")]
    expected = _Expected()
    expected.add([tokenizer.bos_id], 0)
    expected.add(encode("User: ") + encode("Hi ") + _image(tokenizer) + encode("\n"), 0)
    expected.add(encode("Assistant: "), 0)
    expected.add(encode("Hello!") + [tokenizer.eos_id], 1)  # content is stripped
    expected.add(encode("\n"), 0)
    encoded = encode_conversation(turns, tokenizer, "plain", tokens_per_image=TOKENS_PER_IMAGE)
    assert (encoded.tokens, encoded.loss_mask) == (expected.tokens, expected.loss_mask)


@pytest.mark.parametrize(
    ("kind", "template"),
    [("tiktoken", "llama3"), ("huggingface", "llama3"), ("tiktoken", "plain"), ("sentencepiece", "plain")],
)
def test_generation_prompt_is_the_training_prefix(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str, template: str
) -> None:
    tokenizer = tokenizers[kind]
    history = CONVERSATION[:2]
    prompt = encode_generation_prompt(history, tokenizer, template, tokens_per_image=TOKENS_PER_IMAGE)
    full = encode_conversation(CONVERSATION, tokenizer, template, tokens_per_image=TOKENS_PER_IMAGE)
    # What the model sees before replying at generation time is exactly what it
    # saw before the reply's first target token in training.
    first_target = full.loss_mask.index(1)
    assert prompt.tokens == full.tokens[:first_target]
    assert set(prompt.loss_mask) == {0}
    assert prompt.turn_starts == full.turn_starts[:2]
    assert prompt.images == full.images[:1]
    suffix = tokenizer.decode(prompt.tokens[full.turn_starts[2] :])
    assert suffix == ("<|start_header_id|>assistant<|end_header_id|>\n\n" if template == "llama3" else "Assistant: ")


def test_stop_token_ids(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    assert stop_token_ids(tokenizer, "llama3") == {tokenizer.special_token_id("<|eot_id|>"), tokenizer.eos_id}
    assert stop_token_ids(tokenizer, "plain") == {tokenizer.eos_id}
    assert stop_token_ids(tokenizers["sentencepiece"], "plain") == {2}
    with pytest.raises(ValueError, match="--chat-template plain"):
        stop_token_ids(tokenizers["sentencepiece"], "llama3")


def test_llama3_needs_its_special_tokens(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    with pytest.raises(ValueError, match=r"'<\|begin_of_text\|>'.*--chat-template plain"):
        encode_conversation(CONVERSATION, tokenizers["sentencepiece"], "llama3")


@pytest.mark.parametrize(
    ("turns", "template", "tokens_per_image", "message"),
    [
        ([Turn("user", "hi")], "chatml", 4, "unknown chat template 'chatml'"),
        ([Turn("tool", "hi")], "plain", 4, "turn 0 has role 'tool'"),  # type: ignore[arg-type]
        ([Turn("user", "<image>")], "plain", 0, "tokens_per_image must be at least 1"),
    ],
)
def test_invalid_arguments(
    tokenizers: dict[str, ChrysalisTokenizer], turns: list[Turn], template: str, tokens_per_image: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_conversation(turns, tokenizers["tiktoken"], template, tokens_per_image=tokens_per_image)


def test_empty_conversation(tokenizers: dict[str, ChrysalisTokenizer]) -> None:
    tokenizer = tokenizers["tiktoken"]
    encoded = encode_conversation([], tokenizer, "llama3")
    assert encoded == EncodedConversation(tokens=[tokenizer.bos_id], loss_mask=[0], images=[], turn_starts=[])


# ---------------------------------------------------------------------------------------------------------
# The fast path (cached template pieces, batched content encoding) against plain per-piece encoding
# ---------------------------------------------------------------------------------------------------------
def _reference_encoding(turns: list[Turn], tokenizer: ChrysalisTokenizer, template: str) -> EncodedConversation:
    """The template spelled out with one `encode` / `encode_continuation` call per piece, no cache, no batch."""
    result = EncodedConversation()
    state = {"first": True}

    def ids(values: list[int], target: bool) -> None:
        result.tokens.extend(values)
        result.loss_mask.extend([int(target)] * len(values))

    def text(value: str, target: bool) -> None:
        ids(tokenizer.encode(value) if state["first"] else tokenizer.encode_continuation(value), target)
        state["first"] = False

    special = tokenizer.special_token_id
    if template == "llama3":
        ids([special("<|begin_of_text|>")], False)
    elif tokenizer.bos_id is not None:
        ids([tokenizer.bos_id], False)
    for turn in turns:
        target = turn.role == "assistant"
        result.turn_starts.append(len(result.tokens))
        if template == "llama3":
            ids([special("<|start_header_id|>")], False)
            text(turn.role, False)
            ids([special("<|end_header_id|>")], False)
            text("\n\n", False)
        else:
            text({"system": "System: ", "user": "User: ", "assistant": "Assistant: "}[turn.role], False)
        for index, piece in enumerate(turn.content.strip().split("<image>")):
            if index:
                ids([tokenizer.image_start_id], target)
                result.images.append(ImageSpan(len(result.images), len(result.tokens), target))
                ids([tokenizer.image_start_id] * TOKENS_PER_IMAGE + [tokenizer.image_end_id], target)
            if piece:
                text(piece, target)
        if template == "llama3":
            ids([special("<|eot_id|>")], target)
        else:
            if target:
                ids([tokenizer.eos_id], True)
            text("\n", False)
    return result


FAST_PATH_CONVERSATIONS = [
    CONVERSATION,
    [Turn("user", "  hi  "), Turn("assistant", "<image>")],
    [Turn("user", "<image><image>x<image>"), Turn("assistant", "y\n\n z <|eot_id|> <image_start>"),
     Turn("user", ""), Turn("assistant", "café naïve 🦋 \t tabs")],
    [Turn("system", "\n"), Turn("user", "A" * 30_000), Turn("assistant", " " * 50 + "end")],
]


@pytest.mark.parametrize("kind", ["tiktoken", "huggingface", "sentencepiece"])
@pytest.mark.parametrize("template", ["llama3", "plain"])
def test_batched_encoding_equals_per_piece_encoding(
    tokenizers: dict[str, ChrysalisTokenizer], kind: str, template: str
) -> None:
    from engine.tokenizer.chat import encode_conversations

    tokenizer = tokenizers[kind]
    if template == "llama3" and kind == "sentencepiece":
        pytest.skip("the tiny SentencePiece model has no LLaMA-3 special tokens")
    expected = [_reference_encoding(turns, tokenizer, template) for turns in FAST_PATH_CONVERSATIONS]
    # Twice: the second pass reads the template pieces from the per-tokenizer cache.
    for _ in range(2):
        assert encode_conversations(FAST_PATH_CONVERSATIONS, tokenizer, template, TOKENS_PER_IMAGE) == expected
        assert [encode_conversation(turns, tokenizer, template, TOKENS_PER_IMAGE)
                for turns in FAST_PATH_CONVERSATIONS] == expected
    pieces = ["hello", "", " two  spaces", "\n", "A" * 30_000, "<|eot_id|>", "ünïcödé 日本"]
    assert tokenizer.encode_continuation_batch(pieces) == [tokenizer.encode_continuation(p) for p in pieces]
