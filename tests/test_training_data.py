"""Training data: the batch contract of collate, blending ratios, seed determinism, per-rank slicing, resume."""


import numpy as np
import pytest
import torch

from engine.model import IGNORE_INDEX
from engine.training.data import (
    BlendedSamples,
    RankSlice,
    SyntheticDataset,
    SyntheticSequence,
    blending_indices,
    build_loader,
    collate_packed,
    padded_vocab_size,
    split_ranges,
)

START, END, SLOT = 300, 301, 300


def handmade_sequence() -> SyntheticSequence:
    """doc 0 [0, 80): prompt 0-3, answer 4-9, response image (<image_start> 10, slots 11-74, <image_end> 75),
    answer 76-79. doc 1 [80, 150): prompt 80-82, prompt image (83, slots 84-147, 148), answer 149. Padding 150-159."""
    s = 160
    tokens = np.arange(1000, 1000 + s, dtype=np.int32)
    mask = np.zeros(s, np.uint8)
    docs = np.full(s, -1, np.int32)
    docs[:80], docs[80:150] = 0, 1
    mask[4:80] = 1
    mask[149] = 1
    tokens[[10, 83]] = START
    tokens[11:75] = SLOT
    tokens[84:148] = SLOT
    tokens[[75, 148]] = END
    return SyntheticSequence(tokens, mask, docs, np.array([11, 84], np.int32), np.array([3, 5]), np.array([True, False]))


def test_collate_follows_the_batch_contract():
    seq = handmade_sequence()
    emb = torch.randn(2, 64, 1152).to(torch.bfloat16)
    other = SyntheticDataset(1, 160, images_per_sequence=1, documents_per_sequence=1)[0]
    other_emb = torch.randn(1, 64, 1152).to(torch.bfloat16)
    batch = collate_packed([(seq, emb), (other, other_emb)], seq_length=160)
    labels = batch.labels[0]
    expected = torch.full((160,), IGNORE_INDEX)
    for t in range(3, 10):  # answer text, then <image_start> of the response image
        expected[t] = int(seq.tokens[t + 1])
    expected[74] = END  # the last slot predicts <image_end>
    for t in range(75, 79):
        expected[t] = int(seq.tokens[t + 1])
    expected[148] = int(seq.tokens[149])  # t=79 -> 80 crosses documents: ignored; t=149 -> padding: ignored
    assert torch.equal(labels, expected)
    assert batch.lm_targets == int((batch.labels != IGNORE_INDEX).sum())

    assert torch.equal(batch.position_ids[0, :80], torch.arange(80))
    assert torch.equal(batch.position_ids[0, 80:150], torch.arange(70))
    assert torch.equal(batch.position_ids[0, 150:], torch.arange(10))
    assert batch.document_ids[0, 155] == -1

    # Visual tokens follow visual_positions: row 0's two images, then row 1's (flat index b*S + t).
    assert batch.visual_positions.shape == (192,)
    assert torch.equal(batch.visual_positions[:64], torch.arange(11, 75))
    assert torch.equal(batch.visual_positions[64:128], torch.arange(84, 148))
    start = int(other.image_slot_starts[0])
    assert torch.equal(batch.visual_positions[128:], 160 + torch.arange(start, start + 64))
    assert torch.equal(batch.visual_tokens[:64], emb[0])
    assert torch.equal(batch.visual_tokens[128:], other_emb[0])
    assert batch.visual_target_mask[:64].all() and not batch.visual_target_mask[64:128].any()
    assert batch.visual_targets == 128


def test_collate_pads_short_sequences_and_rejects_long_ones():
    seq = handmade_sequence()
    batch = collate_packed([(seq, torch.zeros(2, 64, 1152, dtype=torch.bfloat16))], seq_length=200)
    assert batch.tokens.shape == (1, 200) and (batch.document_ids[0, 160:] == -1).all()
    assert (batch.labels[0, 159:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="--seq-length"):
        collate_packed([(seq, torch.zeros(2, 64, 1152))], seq_length=100)


def test_blending_ratios_within_one_percent_over_10000_samples():
    datasets = [(0.5, SyntheticDataset(100, 256, seed=1)), (0.3, SyntheticDataset(50, 256, seed=2)),
                (0.2, SyntheticDataset(30, 256, seed=3))]
    samples = BlendedSamples(datasets, (1.0, 0.0, 0.0), 0, 10_000, seed=7)
    counts = np.bincount(samples.dataset_index, minlength=3) / 10_000
    assert np.all(np.abs(counts - [0.5, 0.3, 0.2]) < 0.01), counts
    # Each dataset is read as whole shuffled epochs: the first epoch of dataset 2 visits each sequence once.
    seen = [samples.locate(i)[1] for i in range(10_000) if samples.dataset_index[i] == 2][:30]
    assert sorted(seen) == list(range(30))


def test_blending_uses_megatron_helper_and_unnormalised_weights():
    dataset_index, sample_index = blending_indices([2.0, 6.0], 1000)
    assert np.bincount(dataset_index).tolist() == [250, 750]
    assert sample_index[dataset_index == 1].tolist() == list(range(750))


def test_unweighted_data_paths_blend_in_proportion_to_each_split(tmp_path):
    """Megatron's `--data-path A B C` (no weights) was refused ("'A' is not a weight", or "an odd count" for
    three paths); each build now contributes in proportion to its packed sequences in the split."""
    from engine.training.config import parse_training_config

    paths = [str(tmp_path / name) for name in ("a", "b", "c")]
    config = parse_training_config(["--data-path", *paths, "--mock-data"])
    assert config.data.weighted_paths() == [(None, p) for p in paths]
    assert parse_training_config(["--data-path", "2", paths[0], "1", paths[1], "--mock-data"]).data.weighted_paths() \
        == [(2.0, paths[0]), (1.0, paths[1])]
    data = [(None, SyntheticDataset(60, 256, seed=1)), (None, SyntheticDataset(30, 256, seed=2)),
            (None, SyntheticDataset(10, 256, seed=3))]
    train = BlendedSamples(data, (0.9, 0.1, 0.0), 0, 900, seed=4)  # train splits: 54, 27, 9 sequences
    assert np.bincount(train.dataset_index, minlength=3).tolist() == [540, 270, 90]
    valid = BlendedSamples(data, (0.9, 0.1, 0.0), 1, 100, seed=4)  # valid splits: 6, 3, 1
    assert np.bincount(valid.dataset_index, minlength=3).tolist() == [60, 30, 10]


def test_an_empty_split_or_build_says_which_and_why():
    """An empty build said 'the train split is empty in every dataset: change --split', which cannot help."""
    with pytest.raises(ValueError, match="dataset 0: no packed sequences to train on .*rejects.jsonl"):
        BlendedSamples([(1.0, SyntheticDataset(0, 256))], (1.0, 0.0, 0.0), 0, 4, seed=0)
    with pytest.raises(ValueError, match=r"valid split is empty in every dataset \(dataset 0: 15 sequences, 0 in "
                                         r"valid\): change --split"):
        BlendedSamples([(1.0, SyntheticDataset(15, 256))], (0.98, 0.02, 0.0), 1, 4, seed=0)


def test_order_depends_only_on_seed_and_splits_are_disjoint():
    data = [(1.0, SyntheticDataset(200, 256))]
    a = BlendedSamples(data, (0.9, 0.1, 0.0), 0, 500, seed=1)
    b = BlendedSamples(data, (0.9, 0.1, 0.0), 0, 500, seed=1)
    c = BlendedSamples(data, (0.9, 0.1, 0.0), 0, 500, seed=2)
    valid = BlendedSamples(data, (0.9, 0.1, 0.0), 1, 50, seed=1)
    order = [a.locate(i) for i in range(500)]
    assert order == [b.locate(i) for i in range(500)]
    assert order != [c.locate(i) for i in range(500)]
    assert {s for _, s in order} == set(range(180))
    assert {valid.locate(i)[1] for i in range(50)} <= set(range(180, 200))
    assert split_ranges(200, (0.98, 0.02, 0.0)) == [(0, 196), (196, 200), (200, 200)]


def test_ranks_slice_the_same_global_batches():
    g, m = 8, 2
    one = list(RankSlice(g, m, 0, 1, 0, 4 * g))
    ranks = [list(RankSlice(g, m, r, 2, 0, 4 * g // 2)) for r in range(2)]
    for step in range(4):
        whole = set(one[step * g:(step + 1) * g])
        parts = set(ranks[0][step * 4:(step + 1) * 4]) | set(ranks[1][step * 4:(step + 1) * 4])
        assert whole == parts == set(range(step * g, (step + 1) * g))


def _tokens(loader):
    return [b.tokens.clone() for b in loader]


def test_loader_resumes_exactly_and_workers_match():
    data = [(0.6, SyntheticDataset(40, 256, seed=1)), (0.4, SyntheticDataset(40, 256, seed=2))]
    samples = BlendedSamples(data, (1.0, 0.0, 0.0), 0, 6 * 4, seed=3)
    kwargs = dict(global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seq_length=256, pin_memory=False)
    full = _tokens(build_loader(samples, consumed_samples=0, num_workers=0, **kwargs))
    resumed = _tokens(build_loader(samples, consumed_samples=8, num_workers=0, **kwargs))
    workers = _tokens(build_loader(samples, consumed_samples=0, num_workers=2, **kwargs))
    assert len(full) == 12 and len(resumed) == 8
    assert all(torch.equal(x, y) for x, y in zip(full[4:], resumed))
    assert all(torch.equal(x, y) for x, y in zip(full, workers))
    with pytest.raises(ValueError, match="global-batch-size"):
        build_loader(samples, consumed_samples=6, num_workers=0, **kwargs)


def test_vocab_padding_matches_megatron():
    assert padded_vocab_size(302, 128) == 384
    assert padded_vocab_size(128258, 128, tensor_parallel_size=2) == 128512
