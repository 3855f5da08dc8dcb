"""Generation units on a random tiny model (fp32 CPU): the key-padding mask of cached decoding against full
forwards, cached decoding against recompute-every-step, batched against one prompt at a time with text-mode and
image-mode rows in the same steps, sampling, stopping and the per-row image state machine; the static KV cache
(written in place), the tensorised row state (one step, every transition), chunked prefill, the compiled step
(fullgraph, so no Python branch on row data) against eager, and vocabulary padding never being generated."""

import pytest
import torch
import torch.nn.functional as F

from engine.config import preset
from engine.generation import PromptTokens, SamplingConfig, VPiTGenerator
from engine.generation.decode import sample_from_logits
from engine.generation.decode_batch import NO_OUTPUT, SLOT, TEXT_MODE
from engine.model.attention import attend_decode, key_padding_causal_mask
from engine.model.llama import LayerKVCache
from engine.model.vpit import build_model

START, END, STOP, VALID = 90, 91, 95, 92  # image ids, a stop id, valid vocabulary (< the model's 96 rows)
TPI = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=96), seed=1).eval()


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def image_prompt(seed: int) -> PromptTokens:
    """BOS-ish text, one prompt image block, more text."""
    tokens = [1, 5, 7, START] + [START] * TPI + [END, 3, 11]
    return PromptTokens(tokens=tokens, image_slot_starts=[4], image_tokens=unit(1, TPI, 1152, seed=seed), seed=seed)


class ScriptedImages(VPiTGenerator):
    """Greedy, but row r's sample starts an image at its step 2 + 3 * seed (so rows switch modes at different
    steps) and stops at `stop_at` + seed when given. Tensor ops on the whole batch, like the real selection."""

    stop_at: int | None = None

    def select_text_tokens(self, logits, step, batch, sampling):
        chosen = super().select_text_tokens(logits, step, batch, sampling)
        if self.stop_at is not None:
            chosen = torch.where(step == self.stop_at + batch.seeds, STOP, chosen)
        return torch.where(step == 2 + 3 * batch.seeds, START, chosen)


def make(model, cls=VPiTGenerator, **kw):
    return cls(model, image_start_id=START, image_end_id=END, stop_ids={STOP}, valid_vocab_size=VALID, pad_id=0, **kw)


# --------------------------------------------------------------------------------------------- model mask
def test_key_padding_mask_blocks_padding_and_lets_padding_see_itself():
    keys = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = key_padding_causal_mask(keys, 2)  # queries are keys 2 and 3
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert mask[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    prefill = key_padding_causal_mask(keys[:1], 4)[0, 0]
    assert prefill[0].tolist() == [True, False, False, False]  # a padding query sees only itself: no NaN row


def test_cached_decoding_with_left_padding_equals_each_row_alone(model):
    """Prefill two left-padded prompts, then decode 4 steps in which row 0 feeds visual tokens and row 1 token ids;
    every hidden state equals a full (uncached, unpadded) forward of that row alone, within 1e-5."""
    lengths = [5, 9]
    prompt = [torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    steps = 4
    visual = unit(steps, 1152, seed=3)
    step_ids = torch.randint(0, 90, (steps,), generator=torch.Generator().manual_seed(7))
    width = max(lengths)
    tokens = torch.zeros(2, width, dtype=torch.long)
    key_mask = torch.zeros(2, width, dtype=torch.bool)
    for b, p in enumerate(prompt):
        tokens[b, width - len(p):] = p
        key_mask[b, width - len(p):] = True
    caches = [LayerKVCache(2, 2, width + steps, 16, torch.float32, "cpu") for _ in range(4)]
    with torch.no_grad():
        cached = [model(tokens, kv_caches=caches, attention_mask=key_mask)[:, -1]]
        for t in range(steps):
            key_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            step = torch.tensor([[START], [int(step_ids[t])]])
            cached.append(model(step, visual_tokens=visual[t:t + 1], visual_positions=torch.tensor([0]),
                                kv_caches=caches, attention_mask=key_mask)[:, -1])
        # Row 0 alone: prompt + slot placeholders carrying the visual tokens; row 1 alone: prompt + ids.
        row0 = torch.cat([prompt[0], torch.full((steps,), START)])[None]
        full0 = model(row0, visual_tokens=visual, visual_positions=torch.arange(lengths[0], lengths[0] + steps))
        full1 = model(torch.cat([prompt[1], step_ids])[None])
    for t in range(steps + 1):
        torch.testing.assert_close(cached[t][0], full0[0, lengths[0] - 1 + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(cached[t][1], full1[0, lengths[1] - 1 + t], atol=1e-5, rtol=0)


def test_attention_mask_needs_a_cache_and_the_right_shape(model):
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="with kv_caches"):
        model(tokens, attention_mask=torch.ones(1, 3, dtype=torch.bool))
    caches = [LayerKVCache(1, 2, 8, 16, torch.float32, "cpu") for _ in range(4)]
    with pytest.raises(ValueError, match=r"expected \(1, 3\)"):
        model(tokens, kv_caches=caches, attention_mask=torch.ones(1, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------- generation
def assert_same(a, b, atol=1e-5):
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason and a.new_positions == b.new_positions
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_cached_generation_equals_recompute_every_step(model):
    prompts = [image_prompt(0), PromptTokens(tokens=[1, 2, 3], seed=1)]
    sampling = SamplingConfig(max_new_tokens=100)
    cached = make(model, ScriptedImages).generate(prompts, sampling)
    recomputed = make(model, ScriptedImages, use_kv_cache=False).generate(prompts, sampling)
    for a, b in zip(cached, recomputed):
        assert_same(a, b)
        assert len(a.images) == 1 and a.images[0].shape == (TPI, 1152)
        start = a.token_ids.index(START)
        assert a.token_ids[start + 1] == END  # slots are not ids: <image_start> then the forced <image_end>
        torch.testing.assert_close(a.images[0].norm(dim=-1), torch.ones(TPI))
    # The rows switched to image mode at different steps (2 and 5), so text and image rows shared steps.
    assert [r.token_ids.index(START) for r in cached] == [2, 5]


def test_batched_equals_one_at_a_time(model):
    prompts = [image_prompt(0), PromptTokens(tokens=[1, 2, 3], seed=1), PromptTokens(tokens=list(range(1, 20)),
                                                                                      seed=2)]
    for sampling in (SamplingConfig(max_new_tokens=90),
                     SamplingConfig(max_new_tokens=90, temperature=0.8, top_p=0.9, seed=5)):
        batched = make(model, ScriptedImages).generate(prompts, sampling)
        for prompt, result in zip(prompts, batched):
            assert_same(result, make(model, ScriptedImages).generate([prompt], sampling)[0])


def test_sampling_is_seeded_per_sample_and_respects_the_vocabulary(model):
    prompts = [PromptTokens(tokens=[1, 2], seed=s) for s in range(4)]
    hot = SamplingConfig(max_new_tokens=60, temperature=5.0, seed=1)
    first = make(model).generate(prompts, hot)
    again = make(model).generate(prompts, hot)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) == 4  # different seeds, different samples
    other = make(model).generate(prompts, SamplingConfig(max_new_tokens=60, temperature=5.0, seed=2))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]
    for r in first:
        assert all(t < VALID for t in r.token_ids)  # never a padding row of the embedding
        # <image_end> is never sampled: it only follows a generated image.
        assert r.token_ids.count(END) == r.token_ids.count(START) == len(r.images)
    # A vanishing nucleus keeps only the most likely token: greedy.
    nucleus = make(model).generate(prompts, SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=1e-6))
    greedy = make(model).generate(prompts, SamplingConfig(max_new_tokens=20))
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_stop_tokens_length_budget_and_unfinished_images(model):
    gen = make(model, ScriptedImages)
    gen.stop_at = 80  # after the image (steps 2..67); sample 1 stops at step 81
    results = gen.generate([PromptTokens(tokens=[1, 2], seed=0), PromptTokens(tokens=[4], seed=1)],
                           SamplingConfig(max_new_tokens=200))
    assert [r.finish_reason for r in results] == ["stop", "stop"]
    assert STOP not in results[0].token_ids
    assert results[0].new_positions == 80 and results[1].new_positions == 81
    # A budget that ends inside an image: the image is finished (64 slots + <image_end>), then the row stops.
    short = make(model, ScriptedImages).generate([PromptTokens(tokens=[1, 2], seed=0)],
                                                 SamplingConfig(max_new_tokens=10))[0]
    assert short.finish_reason == "length" and len(short.images) == 1
    assert short.new_positions == 3 + TPI + 1 and short.token_ids[-1] == END


def test_prompt_errors(model):
    with pytest.raises(ValueError, match="image_tokens"):
        make(model).generate([PromptTokens(tokens=[1] * 70, image_slot_starts=[1])], SamplingConfig())
    with pytest.raises(ValueError, match="exceed the model's"):
        make(model).generate([PromptTokens(tokens=[1] * 10)], SamplingConfig(max_new_tokens=5000))
    with pytest.raises(ValueError, match="--top-p"):
        SamplingConfig(top_p=0)


# --------------------------------------------------------------------------------------------- static cache
def test_static_cache_is_written_in_place_and_refuses_overflow():
    cache = LayerKVCache(2, 2, 6, 4, torch.float32, "cpu")
    k_ptr = cache.k.data_ptr()
    k1, v1 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k, v = cache.update(k1, v1)  # prefill: appended at length 0
    assert k.shape == (2, 2, 3, 4) and k.data_ptr() == k_ptr and cache.length == 3
    k2, v2 = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    k, v = cache.update(k2, v2)  # a decode step: a longer view of the same buffer, nothing copied or grown
    assert k.shape == (2, 2, 4, 4) and k.data_ptr() == k_ptr and cache.k.data_ptr() == k_ptr
    torch.testing.assert_close(k, torch.cat([k1, k2], 2), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v1, v2], 2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="overflow: 7 > capacity 6"):
        cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    # Static-shape mode (compiled steps): written at a device index, the whole buffer comes back.
    cache.write_index = torch.tensor([5])
    k3 = torch.randn(2, 2, 1, 4)
    k, _ = cache.update(k3, k3)
    assert k.shape == (2, 2, 6, 4) and k.data_ptr() == k_ptr
    torch.testing.assert_close(cache.k[:, :, 5:6], k3, rtol=0, atol=0)
    torch.testing.assert_close(cache.k[:, :, :4], torch.cat([k1, k2], 2), rtol=0, atol=0)


def test_decode_attention_groups_query_heads_without_repeating_kv():
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    keep = torch.rand(3, 1, 1, 10) > 0.3
    keep[..., -1] = True
    bias = torch.zeros(3, 1, 1, 10).masked_fill(~keep, float("-inf"))
    for mask in (None, keep, bias):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else keep, enable_gqa=True)
        torch.testing.assert_close(attend_decode(q, k, v, mask), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- row state
class FixedChoices(VPiTGenerator):
    """The LM head's choice is given per row (a tensor), to drive every transition of one step."""

    choices: torch.Tensor

    def select_text_tokens(self, logits, step, batch, sampling):
        return self.choices


def test_one_step_of_the_row_state_machine(model):
    """Six rows, one in each situation, advanced by one step of tensor ops: text token, `<image_start>`, stop,
    out of budget, mid-image (feeds a slot), last slot fed (`<image_end>` forced), and a finished row."""
    gen = make(model, FixedChoices)
    sampling = SamplingConfig(max_new_tokens=10)
    batch = gen._prepare([PromptTokens(tokens=[1, 2, 3], seed=i) for i in range(7)], sampling)
    gen._prefill(batch)
    batch.mode.copy_(torch.tensor([TEXT_MODE, TEXT_MODE, TEXT_MODE, TEXT_MODE, 5, TPI, TEXT_MODE]))
    batch.new_positions.copy_(torch.tensor([0, 0, 0, 10, 9, 12, 4]))
    batch.active[6] = False
    gen.choices = torch.tensor([7, START, STOP, 7, 7, 7, 7])
    tokens, visual, feeding = gen._advance(batch, batch.steps[3:4], sampling, skip_unused=False)
    assert tokens.tolist() == [7, START, 0, 0, START, END, 0]  # a slot's id is a placeholder, 0 is padding
    assert feeding.tolist() == [False, False, False, False, True, False, False]
    assert visual.shape == (7, 1152)
    torch.testing.assert_close(visual.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(batch.visual_out[4, 3], visual[4], rtol=0, atol=0)
    assert batch.tokens_out[:, 3].tolist() == [7, START, NO_OUTPUT, NO_OUTPUT, SLOT, END, NO_OUTPUT]
    assert batch.mode.tolist() == [TEXT_MODE, 0, TEXT_MODE, TEXT_MODE, 6, TEXT_MODE, TEXT_MODE]
    assert batch.active.tolist() == [True, True, False, False, True, True, False]
    assert batch.stopped.tolist() == [False, False, True, False, False, False, False]
    assert batch.new_positions.tolist() == [1, 1, 0, 10, 10, 13, 4]  # a started image may pass the budget


# --------------------------------------------------------------------------------------------- prefill
def test_chunked_prefill_equals_one_forward(model):
    """Left-padded prompts whose image slots cross chunk boundaries: prefill in chunks of 7 positions fills the
    same caches and last hidden states as one forward, and decoding from them gives the same results."""
    prompts = [image_prompt(0), PromptTokens(tokens=list(range(1, 30)), seed=1),
               PromptTokens(tokens=[2, 3] + image_prompt(2).tokens, image_slot_starts=[6],
                            image_tokens=unit(1, TPI, 1152, seed=2), seed=2)]
    sampling = SamplingConfig(max_new_tokens=80)
    whole, chunked = make(model, ScriptedImages), make(model, ScriptedImages, prefill_chunk=7)
    batches = []
    for gen in (whole, chunked):
        batch = gen._prepare(prompts, sampling)
        gen._prefill(batch)
        batches.append(batch)
    torch.testing.assert_close(batches[1].hidden, batches[0].hidden, atol=1e-5, rtol=0)
    length = batches[0].prompt_len
    for a, b in zip(batches[0].caches, batches[1].caches):
        assert a.length == b.length == length
        torch.testing.assert_close(b.k[:, :, :length], a.k[:, :, :length], atol=1e-5, rtol=0)
        torch.testing.assert_close(b.v[:, :, :length], a.v[:, :, :length], atol=1e-5, rtol=0)
    for a, b in zip(whole.generate(prompts, sampling), chunked.generate(prompts, sampling)):
        assert_same(a, b)


# --------------------------------------------------------------------------------------------- sampling
def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_from_logits(logits, u, 1.0, 1.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    assert counts[3] == 0  # never a token of zero probability
    # top-p 0.8 keeps the two most likely tokens (0.665 + 0.245 mass before the third), renormalised.
    kept = torch.bincount(sample_from_logits(logits, u, 1.0, 0.8), minlength=4).float() / 20000
    torch.testing.assert_close(kept, torch.tensor([0.731, 0.269, 0.0, 0.0]), atol=0.015, rtol=0)


def test_padded_vocabulary_rows_are_never_generated():
    """The decode loop goes through the model's masked LM-head path: padding rows with the largest logits by far
    are never chosen, greedy or sampled, even when the caller's valid vocabulary includes them."""
    padded = build_model(preset("tiny", vocab_size=128, real_vocab_size=100), seed=1).eval()
    with torch.no_grad():
        padded.output.weight[100:] = padded.output.weight[:100].abs().max() * 50  # win every unmasked argmax
    gen = VPiTGenerator(padded, image_start_id=96, image_end_id=97, stop_ids=set(), valid_vocab_size=128)
    assert torch.isinf(gen.text_logits(torch.randn(3, 64))[:, 100:]).all()
    prompts = [PromptTokens(tokens=[1, 2, 3], seed=s) for s in range(3)]
    for sampling in (SamplingConfig(max_new_tokens=30), SamplingConfig(max_new_tokens=30, temperature=3.0)):
        for result in gen.generate(prompts, sampling):
            assert result.token_ids and max(result.token_ids) < 100


# --------------------------------------------------------------------------------------------- compiled step
def test_compiled_step_equals_eager():
    """The whole step (selection + forward over the static cache) compiled with fullgraph=True, which fails on
    any Python branch on tensor data, gives the eager results: left padding, prompt and generated images, text
    and image rows in the same steps, sampling, a padded vocabulary; a second batch of the same shapes reuses
    the first one's buffers (what a captured CUDA graph needs). aot_eager on CPU: tracing, not inductor."""
    padded = build_model(preset("tiny", vocab_size=128, real_vocab_size=100), seed=2).eval()
    prompts = [image_prompt(0), PromptTokens(tokens=[1, 2, 3], seed=1)]
    others = [image_prompt(3), PromptTokens(tokens=[4, 5, 6], seed=4)]
    compiled = make(padded, ScriptedImages, compile=True, compile_options={"backend": "aot_eager"})
    eager = make(padded, ScriptedImages, compile=False)
    sampling = SamplingConfig(max_new_tokens=75, temperature=0.8, top_p=0.9, seed=3)
    addresses = []
    for batch_prompts in (prompts, others):
        for a, b in zip(compiled.generate(batch_prompts, sampling), eager.generate(batch_prompts, sampling)):
            assert_same(a, b)
            assert len(a.images) == 1
        (pooled,) = compiled._static_pool.values()
        addresses.append([t.data_ptr() for t in (pooled.caches[0].k, pooled.mode, pooled.hidden, pooled.key_bias)])
    assert compiled.compile and compiled._compiled_ok  # it ran compiled, not the eager fallback
    assert addresses[0] == addresses[1]


# --------------------------------------------------------------------------------------------- CPU kernels
def test_onednn_linears_switch_the_big_cpu_linears_and_restore_them():
    from engine.generation.linear_kernels import MIN_WEIGHT_ELEMENTS, onednn_linear_available, onednn_linears

    if not onednn_linear_available():
        pytest.skip("torch built without oneDNN")
    wide = build_model(preset("tiny", vocab_size=512, hidden_size=256, ffn_hidden_size=512, num_layers=2,
                              num_attention_heads=4, num_query_groups=2), seed=3).eval()
    big = [m for m in wide.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= MIN_WEIGHT_ELEMENTS]
    tokens = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = wide(tokens)
        with onednn_linears(wide) as switched:
            # w1, w3, w2 per layer, the LM head (512 x 256), projector.fc1 and visual_head.fc2 (1152 x 256)
            assert switched == len(big) == 2 * 3 + 1 + 2
            assert all("forward" in m.__dict__ for m in big)
            torch.testing.assert_close(wide(tokens), reference, atol=1e-5, rtol=1e-5)
        assert not any("forward" in m.__dict__ for m in wide.modules())
        prompts = [PromptTokens(tokens=[1, 2, 3], seed=0), PromptTokens(tokens=list(range(4, 20)), seed=1)]
        sampling = SamplingConfig(max_new_tokens=20)
        onednn = VPiTGenerator(wide, image_start_id=500, image_end_id=501, stop_ids=set(), valid_vocab_size=500)
        aten = VPiTGenerator(wide, image_start_id=500, image_end_id=501, stop_ids=set(), valid_vocab_size=500,
                             cpu_linear="aten")
        assert [r.token_ids for r in onednn.generate(prompts, sampling)] == \
            [r.token_ids for r in aten.generate(prompts, sampling)]
