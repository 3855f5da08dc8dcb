"""MetaQuery units, in memory: the frozen LLM's prefix-cached query states, the connector, CFG dropout, the decoder
directory rules, the noise schedules and the latent store's sampling/scaling. The CLI-level tests (builds, training,
resume, tensor parallelism, overfitting, rendering) are in tests/test_metaquery_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.metaquery.connector import Connector, ConnectorConfig
from engine.metaquery.data import MetaQueryCollate, MetaQuerySample, NoiseShape, NullPrompt
from engine.metaquery.model import FrozenLLM, MetaQueryHead
from engine.model import build_model
from engine.model.attention import build_attention_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llm():
    return build_model(preset("tiny", vocab_size=256, init_method_std=0.1), seed=3).requires_grad_(False)


def _one_forward_reference(model, prompts, images, queries):
    """prompt ++ queries per row in one forward (right-padded rows, document-causal mask, positions from 0), as a
    plain reading of the recipe; returns the final-normed states of the query positions [B, N, H]."""
    n, hidden = queries.shape
    length = max(len(p) for p in prompts) + n
    rows = []
    for tokens, (slots, emb) in zip(prompts, images):
        h = model.embed(torch.tensor([tokens]), emb.reshape(-1, emb.shape[-1]) if emb is not None else None,
                        (torch.tensor(slots)[:, None] + torch.arange(64)).reshape(-1) if emb is not None else None)
        h = torch.cat([h[0], queries, torch.zeros(length - len(tokens) - n, hidden)])  # [S, H]
        rows.append(h)
    h = torch.stack(rows)
    real = torch.tensor([len(p) + n for p in prompts])
    document_ids = (torch.arange(length)[None, :] >= real[:, None]).long()  # 0 = prompt + queries, 1 = padding
    mask = build_attention_mask("sdpa", document_ids, len(prompts), length, h.device)
    rope = model.rope(torch.arange(length).expand(len(prompts), length), h.dtype)
    for layer in model.layers.values():
        h = layer(h, rope, mask)
    h = model.norm(h)
    return torch.stack([h[b, len(p):len(p) + n] for b, p in enumerate(prompts)])


def test_query_states_through_the_prompt_cache_equal_one_forward_and_train_only_the_queries():
    """The prompt prefilled under no_grad + the queries over its KV cache == one forward over prompt ++ queries
    (values and the queries' gradient), for left-padded rows of different lengths and a row with a prompt image;
    and no LLM parameter gets a gradient."""
    model = _llm()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (7, 1, 80)]
    emb = torch.nn.functional.normalize(torch.randn(1, 64, 1152, generator=g), dim=-1)
    images = [(None, None), (None, None), ([5], emb)]
    prompts[2][4:4 + 66] = [250] * 66  # an image block's placeholder ids
    queries = torch.nn.Parameter(torch.randn(6, 64, generator=g) * 0.1)

    from engine.metaquery.data import left_padded

    tokens, mask, visual, positions = left_padded(
        [(np.asarray(p), np.asarray(s if s is not None else [], dtype=np.int64)) for p, (s, _) in zip(prompts, images)],
        [e if e is not None else torch.zeros(0, 64, 1152) for _, e in images], pad_id=0)
    states = FrozenLLM(model).query_states(tokens, mask, visual.float(), positions, queries, grad=True)
    weights = torch.randn(states.shape, generator=g)  # a loss whose gradient does not vanish under the final norm
    (grad,) = torch.autograd.grad((states * weights).sum(), queries)

    reference_queries = torch.nn.Parameter(queries.detach().clone())
    reference = _one_forward_reference(model, prompts, images, reference_queries)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), reference_queries)
    torch.testing.assert_close(states, reference, rtol=1e-5, atol=1e-5)
    assert (grad - reference_grad).norm() <= 1e-5 * reference_grad.norm()  # fp32 sums in another order
    assert reference_grad.norm() > 1e-2
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        frozen = FrozenLLM(model).query_states(tokens, mask, visual.float(), positions, queries, grad=False)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, states.detach())


def test_query_init_is_the_mean_embedding_with_tiny_noise():
    model = _llm()
    init = FrozenLLM(model).query_init(77, seed=0)
    mean = model.tok_embeddings.weight[:model.config.num_real_tokens].mean(0)
    assert init.shape == (77, 64)
    assert (init - mean).abs().max() < 1e-3 and (init[0] != init[1]).any()  # N(mean, 1e-9 cov): distinct, close


def test_connector_is_bidirectional_with_the_reference_output_norm():
    config = ConnectorConfig(hidden_size=128, output_size=48, num_layers=2, input_scale=5.5 ** 0.5)
    assert config.num_heads == 2  # hidden // 64, as the reference
    connector = Connector(config, seed=1)
    assert torch.allclose(connector.norm.weight, torch.full((48,), 5.5 ** 0.5))
    x = torch.randn(2, 9, 128)
    out = connector(x)
    assert out.shape == (2, 9, 48)
    changed = x.clone()
    changed[:, -1] += 1.0  # the last query changes the first one's output: no causal mask
    assert not torch.allclose(connector(changed)[:, 0], out[:, 0])
    assert torch.equal(Connector(config, seed=1)(x), out)  # deterministic per seed


def _samples():
    text = MetaQuerySample(tokens=np.arange(10, 20, dtype=np.int32), image_slot_starts=np.zeros(0, np.int64),
                           image_rows=np.zeros(0, np.int64), target_row=0)
    instruct = MetaQuerySample(tokens=np.arange(100, dtype=np.int32), image_slot_starts=np.asarray([3]),
                               image_rows=np.asarray([1]), target_row=2)
    return text, instruct


def _collate(cfg_prob=0.1, cfg_instruct_prob=0.2):
    nulls = [NullPrompt(np.asarray([1, 2, 3], np.int32), np.zeros(0, np.int64)),
             NullPrompt(np.asarray([1] + [7] * 66 + [2], np.int32), np.asarray([2]))]
    return MetaQueryCollate(seed=7, pad_id=0, nulls=nulls, noise=NoiseShape(4, 8, True), cfg_prob=cfg_prob,
                            cfg_instruct_prob=cfg_instruct_prob)


def test_cfg_dropout_rates_are_the_reference_and_dropped_prompts_become_the_null_prompt():
    text, instruct = _samples()
    collate = _collate()
    emb = torch.ones(1, 64, 1152, dtype=torch.bfloat16)
    latent = torch.zeros(8, 8, 8, dtype=torch.bfloat16)
    t2i = [collate._dropout(i, 0) for i in range(20000)]
    inst = np.asarray([collate._dropout(i, 1) for i in range(20000)])
    assert abs(np.mean([d[0] for d in t2i]) - 0.1) < 0.01 and not any(d[1] for d in t2i)
    assert abs(inst[:, 0].mean() - 0.2) < 0.01 and abs(inst[:, 1].mean() - 0.2) < 0.01
    assert abs((inst[:, 0] & inst[:, 1]).mean() - 0.1) < 0.01  # dataset.py's u < 0.2 and 0.1 <= u < 0.3
    dropped = next(i for i in range(100) if collate._dropout(i, 0)[0])
    kept = next(i for i in range(100) if not collate._dropout(i, 0)[0])
    batch = collate([(dropped, text, torch.zeros(0, 64, 1152), latent), (kept, text, torch.zeros(0, 64, 1152), latent)])
    assert batch.tokens.shape == (2, 10) and batch.dropped_text.tolist() == [True, False]
    assert batch.tokens[0].tolist() == [0] * 7 + [1, 2, 3]  # left-padded null prompt
    assert batch.tokens[1].tolist() == list(range(10, 20))
    only_images = next(i for i in range(1000) if collate._dropout(i, 1) == (False, True))
    batch = collate([(only_images, instruct, emb, latent)])
    assert batch.visual_tokens.shape == (64, 1152) and not batch.visual_tokens.float().any()  # zeroed image
    assert batch.visual_positions.tolist() == list(range(3, 67)) and batch.tokens.shape == (1, 100)


def test_noise_is_a_function_of_the_sample_index_only():
    text, _ = _samples()
    collate = _collate()
    latent = torch.zeros(8, 8, 8, dtype=torch.bfloat16)
    item = lambda i: (i, text, torch.zeros(0, 64, 1152), latent)
    a = collate([item(5), item(9)])
    b = collate([item(9)])
    assert torch.equal(a.noise[1], b.noise[0]) and torch.equal(a.u[1], b.u[0])
    assert torch.equal(a.posterior_noise[1], b.posterior_noise[0]) and not torch.equal(a.noise[0], a.noise[1])


def test_decoder_directory_rules(tmp_path):
    from engine.metaquery.decoder import NoiseSchedule, inspect_decoder, write_tiny_decoder
    from engine.visualizer.autoencoder import tiny_autoencoder

    with pytest.raises(ValueError, match="neither unet/config.json"):
        inspect_decoder(tmp_path)
    vae = tiny_autoencoder(16)
    unet = inspect_decoder(write_tiny_decoder(tmp_path / "sd", "unet", vae, sample_size=8, conditioning_width=24))
    assert (unet.kind, unet.loss_type, unet.conditioning_width, unet.latent_channels) == ("unet", "diff", 24, 4)
    sana = inspect_decoder(write_tiny_decoder(tmp_path / "sana", "sana", vae, sample_size=8, conditioning_width=40))
    assert (sana.kind, sana.loss_type, sana.conditioning_width) == ("sana", "flow", 40)
    flow = NoiseSchedule(sana)  # FlowMatchEuler from Sana's DPM-Solver config, shift 1 as the reference
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy, timesteps, target = flow.noisy_inputs(latents, noise, torch.tensor([0.0, 0.5, 0.9999], dtype=torch.float64))
    sigma = timesteps / 1000
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(target, noise - latents)
    ddpm = NoiseSchedule(unet)
    noisy, timesteps, target = ddpm.noisy_inputs(latents, noise, torch.tensor([0.0, 0.5, 0.9999], dtype=torch.float64))
    assert timesteps.tolist() == [0, 500, 999] and torch.equal(target, noise)
    (tmp_path / "both" / "unet").mkdir(parents=True)
    (tmp_path / "both" / "unet" / "config.json").write_text((tmp_path / "sd" / "unet" / "config.json").read_text())
    (tmp_path / "both" / "transformer").mkdir()
    (tmp_path / "both" / "transformer" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="both unet/ and transformer/"):
        inspect_decoder(tmp_path / "both")


def test_head_holds_only_what_trains():
    config = ConnectorConfig(hidden_size=64, output_size=32, num_layers=1)
    head = MetaQueryHead(8, config, query_init=torch.zeros(8, 64))
    names = {name for name, _ in head.named_parameters()}
    assert "queries" in names and all(n == "queries" or n.startswith("connector.") for n in names)
    frozen = MetaQueryHead(8, config, train_queries=False)
    assert not frozen.queries.requires_grad


def test_vae_latent_build_flags_are_checked(tmp_path):
    from preprocess.config import BuildConfig, BuildError
    from preprocess.vae_latents import describe_vae

    base = {"inputs": ["x.jsonl"], "output": str(tmp_path / "out"), "tokenizer_type": "tiktoken",
            "tokenizer_model": "t", "vision_encoder": "tiny-random"}
    with pytest.raises(BuildError, match="--targets vae-latents needs --vae"):
        BuildConfig(**base, targets="vae-latents")
    with pytest.raises(BuildError, match="--vae is only used with --targets vae-latents"):
        BuildConfig(**base, vae=str(tmp_path))
    with pytest.raises(BuildError, match="describes a diffusers AutoencoderKL or AutoencoderDC"):
        describe_vae(tmp_path, 16)
    from engine.visualizer.autoencoder import tiny_autoencoder

    tiny_autoencoder(16).save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline directory: its vae/ is used
    with pytest.raises(BuildError, match="multiple of the VAE's downsampling factor 2"):
        describe_vae(tmp_path / "pipe", 15)
    info = describe_vae(tmp_path / "pipe", 16)
    assert (info["kind"], info["row_shape"], info["name"]) == ("gaussian", [8, 8, 8], "pipe")
