"""Training data: opening shards, blending, a seed-determined sample order sliced per data-parallel rank, and the
collate function that turns packed sequences into the model's batch contract.

Sample order. Each dataset's split (a contiguous range of its packed sequences, as Megatron splits) is shuffled
once per epoch with a generator keyed by (seed, dataset, split, epoch). Datasets are interleaved by megatron-core's
`build_blending_indices` (greedy: the next sample comes from the dataset furthest below its weight, so the realised
mixture matches the weights to within one sample at every prefix). The result is one global sequence of samples
that depends only on `--seed`, the data and the weights. Global batch `i` is samples [i*G, (i+1)*G); inside it,
micro-batch `m` of data-parallel rank `r` is samples i*G + m*M*dp + r*M + [0, M). The loader state is therefore a
single number, the consumed sample count, and a run resumed under another data-parallel size (same G) still sees
exactly the same global batches.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.model import IGNORE_INDEX

SPLITS = ("train", "valid", "test")


class PackedSequenceLike(Protocol):
    tokens: np.ndarray
    loss_mask: np.ndarray
    document_ids: np.ndarray
    image_slot_starts: np.ndarray
    image_rows: np.ndarray
    image_is_response: np.ndarray


class PackedDataset(Protocol):
    """What `preprocess.shards.ShardReader` provides (and `SyntheticDataset` imitates)."""

    seq_length: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PackedSequenceLike: ...

    def embeddings(self, rows: Any) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------- synthetic data
@dataclass(frozen=True)
class SyntheticSequence:
    tokens: np.ndarray
    loss_mask: np.ndarray
    document_ids: np.ndarray
    image_slot_starts: np.ndarray
    image_rows: np.ndarray
    image_is_response: np.ndarray


class SyntheticDataset:
    """Deterministic packed sequences with the `ShardReader` interface, for tests, benchmarks and `--mock-data`.

    Each sequence packs `documents_per_sequence` documents; each document is a prompt (loss mask 0), images and a
    response (loss mask 1). Text follows `next = (prev + step) % base_vocab_size` with a per-document step, so a
    tiny model can visibly learn it. Every other image, starting with the first, is a response image (its
    `<image_start>`, 64 slots and `<image_end>` are targets). Embedding rows index a fixed random table of unit-norm
    bf16 tokens.

    Args:
        base_vocab_size: text ids are below this; `<image_start>` = base, `<image_end>` = base + 1.
        pad_to: leave the last `pad_to` tokens as padding (document id -1), like a real packer's tail.
    """

    def __init__(self, num_sequences: int, seq_length: int, *, base_vocab_size: int = 300,
                 images_per_sequence: int = 2, documents_per_sequence: int = 2, embedding_rows: int = 16,
                 seed: int = 0, pad_to: int = 0):
        self.num_sequences = num_sequences
        self.seq_length = seq_length
        self.base_vocab_size = base_vocab_size
        self.image_start_id = base_vocab_size
        self.image_end_id = base_vocab_size + 1
        self.vocab_size = base_vocab_size + 2
        self.images_per_sequence = images_per_sequence
        self.documents_per_sequence = documents_per_sequence
        self.seed = seed
        self.pad_to = pad_to
        span = TOKENS_PER_IMAGE + 2
        per_doc = -(-images_per_sequence // documents_per_sequence)
        if per_doc * span + 8 > (seq_length - pad_to) // documents_per_sequence:
            raise ValueError(f"seq_length {seq_length} is too short for {images_per_sequence} images in "
                             f"{documents_per_sequence} documents")
        g = torch.Generator().manual_seed(seed + 7919)
        table = torch.randn(embedding_rows, TOKENS_PER_IMAGE, VISION_DIM, generator=g)
        self.table = torch.nn.functional.normalize(table, dim=-1).to(torch.bfloat16)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> SyntheticSequence:
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        s = self.seq_length
        tokens = np.zeros(s, dtype=np.int32)
        loss_mask = np.zeros(s, dtype=np.uint8)
        document_ids = np.full(s, -1, dtype=np.int32)
        starts, rows, response = [], [], []
        usable = s - self.pad_to
        doc_len = usable // self.documents_per_sequence
        image = 0
        for d in range(self.documents_per_sequence):
            begin, end = d * doc_len, (d + 1) * doc_len
            document_ids[begin:end] = d
            step = int(rng.integers(1, 4))
            value = int(rng.integers(0, self.base_vocab_size))
            per_document = -(-self.images_per_sequence // self.documents_per_sequence)
            n_images = min(self.images_per_sequence - image, per_document)
            prompt = int(rng.integers(2, 6))
            tokens[begin:end] = (value + step * np.arange(end - begin)) % self.base_vocab_size
            loss_mask[begin + prompt:end] = 1
            # Images after the prompt, spaced evenly through the document.
            gap = (end - begin - prompt - n_images * (TOKENS_PER_IMAGE + 2)) // (n_images + 1)
            t = begin + prompt + gap
            for _ in range(n_images):
                is_response = image % 2 == 0
                tokens[t] = self.image_start_id
                tokens[t + 1:t + 1 + TOKENS_PER_IMAGE] = self.image_start_id  # placeholder in slots
                tokens[t + 1 + TOKENS_PER_IMAGE] = self.image_end_id
                loss_mask[t:t + TOKENS_PER_IMAGE + 2] = 1 if is_response else 0
                starts.append(t + 1)
                rows.append(int(rng.integers(0, self.table.shape[0])))
                response.append(is_response)
                t += TOKENS_PER_IMAGE + 2 + gap
                image += 1
        tokens[usable:] = 0
        loss_mask[usable:] = 0
        return SyntheticSequence(tokens=tokens, loss_mask=loss_mask, document_ids=document_ids,
                                 image_slot_starts=np.asarray(starts, dtype=np.int32),
                                 image_rows=np.asarray(rows, dtype=np.int64),
                                 image_is_response=np.asarray(response, dtype=bool))

    def embeddings(self, rows: Any) -> torch.Tensor:
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1))
        return self.table[rows].clone()


# ------------------------------------------------------------------------------------------------- blending
@functools.cache
def _megatron_helpers():
    """megatron-core's compiled dataset helpers, loaded from their file.

    `import megatron.core` runs ~6 s of unrelated imports (Transformer Engine / Apex probing) in every process,
    data-loader workers included; the compiled helper module has no Python dependencies, so it is loaded
    directly from megatron-core's installed package.
    """
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("megatron-core is not installed (pip install megatron-core)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "core" / "datasets"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"helpers_cpp{suffix}"
        if path.is_file():
            loader = importlib.machinery.ExtensionFileLoader("megatron.core.datasets.helpers_cpp", str(path))
            module_spec = importlib.util.spec_from_file_location(loader.name, path, loader=loader)
            module = importlib.util.module_from_spec(module_spec)
            loader.exec_module(module)
            return module
    from megatron.core.datasets import helpers_cpp  # let the real import explain what is missing

    return helpers_cpp


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index [size] int16, sample index within that dataset [size] int64) from megatron-core."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    _megatron_helpers().build_blending_indices(dataset_index, sample_index, weights, len(weights), size, False)
    return dataset_index, sample_index


def split_ranges(num_sequences: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [begin, end) per split (Megatron's rounding of cumulative fractions)."""
    bounds = [0]
    for f in np.cumsum(fractions):
        bounds.append(int(round(float(f) * num_sequences)))
    bounds[-1] = num_sequences
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


class BlendedSamples(torch.utils.data.Dataset):
    """The global sample order of one split: index g -> (PackedSequence, its embeddings [n, 64, 1152] bf16).

    Args:
        datasets: (weight, dataset) pairs; weight-0 or empty-split datasets never contribute. A weight None (an
            unweighted `--data-path A B`) is the number of sequences of that dataset's split, so every dataset
            contributes in proportion to its size, as Megatron blends an unweighted list of prefixes.
        split: 0 train, 1 valid, 2 test.
        num_samples: length of the order (train: train-iters x global batch).
    """

    def __init__(self, datasets: Sequence[tuple[float, PackedDataset]], fractions: Sequence[float], split: int,
                 num_samples: int, seed: int):
        self.datasets = [d for _, d in datasets]
        self.ranges = [split_ranges(len(d), fractions)[split] for d in self.datasets]
        weights = [(float(end - begin) if w is None else w) if end > begin else 0.0
                   for (w, _), (begin, end) in zip(datasets, self.ranges)]
        self.split = split
        self.seed = seed
        self.num_samples = num_samples
        if num_samples and sum(weights) <= 0:
            names = [str(getattr(d, "out_dir", f"dataset {i}")) for i, d in enumerate(self.datasets)]
            if not any(len(d) for d in self.datasets):  # --split cannot help: say so
                raise ValueError(f"{', '.join(names)}: no packed sequences to train on (every record was skipped, "
                                 "or the inputs were empty: see the build's rejects.jsonl)")
            sizes = ", ".join(f"{n}: {len(d)} sequences, {end - begin} in {SPLITS[split]}"
                              for n, d, (begin, end) in zip(names, self.datasets, self.ranges))
            raise ValueError(f"the {SPLITS[split]} split is empty in every dataset ({sizes}): change --split")
        self.weights = weights
        if num_samples:
            self.dataset_index, self.sample_index = blending_indices(weights, num_samples)
        else:
            self.dataset_index = np.zeros(0, np.int16)
            self.sample_index = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_samples

    @functools.lru_cache(maxsize=8)
    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        begin, end = self.ranges[dataset]
        rng = np.random.default_rng([self.seed, dataset, self.split, epoch])
        return begin + rng.permutation(end - begin)

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample -> (dataset, sequence index in that dataset)."""
        dataset = int(self.dataset_index[index])
        k = int(self.sample_index[index])
        begin, end = self.ranges[dataset]
        epoch, offset = divmod(k, end - begin)
        return dataset, int(self._permutation(dataset, epoch)[offset])

    def __getitem__(self, index: int):
        dataset, sequence = self.locate(index)
        packed = self.datasets[dataset][sequence]
        return packed, self.datasets[dataset].embeddings(packed.image_rows)

    def state(self) -> dict[str, Any]:
        """What must match for a resumed run to see the same samples."""
        return {"split": self.split, "seed": self.seed, "sizes": [len(d) for d in self.datasets],
                "weights": [float(w) for w in self.weights]}


class RankSlice(torch.utils.data.Sampler):
    """This rank's global sample indices, in order, from rank-local position `start` (see module docstring)."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, start: int,
                 end: int):
        self.g, self.m, self.rank, self.dp = global_batch_size, micro_batch_size, dp_rank, dp_size
        self.start, self.end = start, end

    def global_index(self, k: int) -> int:
        per_rank = self.g // self.dp
        step, rem = divmod(k, per_rank)
        micro, j = divmod(rem, self.m)
        return step * self.g + micro * self.m * self.dp + self.rank * self.m + j

    def __iter__(self):
        return (self.global_index(k) for k in range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


# ------------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One micro-batch in the model's contract (see `VPiTModel.forward`), plus its target counts.

    Args:
        tokens, position_ids, document_ids, labels: [B, S].
        visual_tokens: [V, 1152] bf16, in the order of `visual_positions` [V] (flat b*S + t).
        visual_target_mask: [V] bool, slot of a response image.
        lm_targets, visual_targets: number of text / visual targets (for global normalisation).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    labels: torch.Tensor
    visual_tokens: torch.Tensor
    visual_positions: torch.Tensor
    visual_target_mask: torch.Tensor
    lm_targets: int
    visual_targets: int

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) if isinstance(getattr(self, f.name), torch.Tensor)
                        else getattr(self, f.name) for f in fields(self)})

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, visual_dtype: torch.dtype | None = None) -> "Batch":
        batch = self._map(lambda t: t.to(device, non_blocking=True))
        if visual_dtype is not None:
            batch.visual_tokens = batch.visual_tokens.to(visual_dtype)
        return batch

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return dict(position_ids=self.position_ids, document_ids=self.document_ids, visual_tokens=self.visual_tokens,
                    visual_positions=self.visual_positions, labels=self.labels,
                    visual_target_mask=self.visual_target_mask)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def _padded(array: np.ndarray, length: int, fill: int, name: str) -> np.ndarray:
    if array.shape[0] > length:
        raise ValueError(f"a packed sequence has {array.shape[0]} tokens, more than --seq-length {length}: "
                         "raise --seq-length to the shards' seq_length")
    if array.shape[0] == length:
        return array
    out = np.full(length, fill, dtype=array.dtype)
    out[:array.shape[0]] = array
    return out


def collate_packed(samples: Sequence[tuple[PackedSequenceLike, torch.Tensor]], seq_length: int) -> Batch:
    """[(PackedSequence, embeddings [n, 64, 1152])] -> Batch. Shorter sequences are padded (document -1, no loss).

    labels[t] = tokens[t+1] when t+1 is a text target: loss_mask[t+1] == 1, t+1 is not an image slot, and t and
    t+1 are in the same document. Image slots are never text targets; response-image slots are visual targets.
    """
    b, s = len(samples), seq_length
    tokens = np.stack([_padded(np.asarray(p.tokens), s, 0, "tokens") for p, _ in samples]).astype(np.int64)
    loss_mask = np.stack([_padded(np.asarray(p.loss_mask), s, 0, "loss_mask") for p, _ in samples]).astype(bool)
    document_ids = np.stack([_padded(np.asarray(p.document_ids), s, -1, "document_ids") for p, _ in samples])
    document_ids = document_ids.astype(np.int64)

    slot_offsets = np.arange(TOKENS_PER_IMAGE, dtype=np.int64)
    positions, targets, embeddings = [], [], []
    for row, (packed, emb) in enumerate(samples):
        starts = np.asarray(packed.image_slot_starts, dtype=np.int64)
        if starts.size == 0:
            continue
        if starts.min() < 1 or starts.max() + TOKENS_PER_IMAGE > s:
            raise ValueError(f"image slots {starts.tolist()} do not fit a sequence of {s} tokens")
        if emb.shape[0] != starts.size:
            raise ValueError(f"{starts.size} images but {emb.shape[0]} embedding rows")
        positions.append((row * s + starts[:, None] + slot_offsets).reshape(-1))  # [n, 64] -> [n*64]
        targets.append(np.repeat(np.asarray(packed.image_is_response, dtype=bool), TOKENS_PER_IMAGE))
        embeddings.append(emb.reshape(-1, emb.shape[-1]))  # [n, 64, 1152] -> [n*64, 1152]
    if positions:
        visual_positions = np.concatenate(positions)
        visual_target_mask = np.concatenate(targets)
        # numpy's single-threaded copy: torch.cat of bf16 on CPU goes through the intra-op thread pool, which was
        # 10x slower than a memcpy on a busy host (and steals cores from the training step).
        if all(e.dtype == torch.bfloat16 for e in embeddings):
            bits = np.concatenate([e.view(torch.int16).numpy() for e in embeddings])
            visual_tokens = torch.from_numpy(bits).view(torch.bfloat16)
        else:
            visual_tokens = torch.cat(embeddings)
    else:
        visual_positions = np.zeros(0, np.int64)
        visual_target_mask = np.zeros(0, bool)
        visual_tokens = torch.zeros(0, VISION_DIM, dtype=torch.bfloat16)

    is_slot = np.zeros(b * s, dtype=bool)
    is_slot[visual_positions] = True
    is_slot = is_slot.reshape(b, s)
    target = loss_mask[:, 1:] & ~is_slot[:, 1:] & (document_ids[:, 1:] == document_ids[:, :-1])
    labels = np.full((b, s), IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = np.where(target, tokens[:, 1:], IGNORE_INDEX)

    # Positions restart at 0 at every document change (padding, document -1, counts as one more document).
    idx = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
    change = np.ones((b, s), dtype=bool)
    change[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    position_ids = idx - np.maximum.accumulate(np.where(change, idx, 0), axis=1)

    return Batch(tokens=torch.from_numpy(tokens), position_ids=torch.from_numpy(position_ids),
                 document_ids=torch.from_numpy(document_ids), labels=torch.from_numpy(labels),
                 visual_tokens=visual_tokens, visual_positions=torch.from_numpy(visual_positions),
                 visual_target_mask=torch.from_numpy(visual_target_mask),
                 lm_targets=int((labels != IGNORE_INDEX).sum()), visual_targets=int(visual_target_mask.sum()))


class _Collate:
    """Picklable collate for worker processes."""

    def __init__(self, seq_length: int):
        self.seq_length = seq_length

    def __call__(self, samples):
        return collate_packed(samples, self.seq_length)


def ignore_preemption_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`. SLURM signals every process of the job (and Ctrl-C every process of the
    terminal's group); a worker that dies on the signal crashes the step the trainer is finishing before it saves.
    Workers ignore the signals the trainer may handle (`--exit-signal`) and end with the loader, or when the trainer
    dies (PyTorch's worker watchdog)."""
    import signal

    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_loader(samples: BlendedSamples, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int, seq_length: int, num_workers: int,
                 pin_memory: bool, collate_fn=None) -> torch.utils.data.DataLoader:
    """Micro-batches of this rank from `consumed_samples` (a multiple of the global batch) to the end.
    `collate_fn` replaces `collate_packed` (another recipe's batches, e.g. engine.metaquery)."""
    if consumed_samples % global_batch_size:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch "
                         f"{global_batch_size}: the checkpoint was written with another --global-batch-size")
    per_rank = global_batch_size // dp_size
    sampler = RankSlice(global_batch_size, micro_batch_size, dp_rank, dp_size,
                        start=consumed_samples // global_batch_size * per_rank,
                        end=len(samples) // global_batch_size * per_rank)
    return torch.utils.data.DataLoader(
        samples, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn or _Collate(seq_length),
        num_workers=num_workers, pin_memory=pin_memory, drop_last=False,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
        worker_init_fn=ignore_preemption_signals if num_workers else None)


# ------------------------------------------------------------------------------------------------- shards
@dataclass
class OpenedData:
    """The datasets of `--data-path`, with what the run needs to know about them."""

    datasets: list[tuple[float, PackedDataset]]
    seq_length: int
    vocab: dict[str, int] | None  # base_vocab_size, image_start_id, image_end_id
    tokenizer_dir: Path | None
    manifest_refs: dict[str, Any]  # tokenizer fingerprint, vision encoder reference, builds


def _manifest_field(manifest: dict, *names: str) -> Any:
    for name in names:
        node: Any = manifest
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def open_shards(weighted_paths: Sequence[tuple[float, str]], *, verify_checksums: bool) -> OpenedData:
    """Opens every build with `ShardReader` (format version and sizes always; sha256 when asked) and refuses
    builds made with different tokenizers or vision encoders, or different sequence lengths."""
    from engine.data.shards import ShardReader

    datasets = []
    tokenizer_prints, encoder_prints, lengths, described = {}, {}, {}, {}
    for weight, path in weighted_paths:
        try:
            reader = ShardReader(path, check_sha256=verify_checksums)
        except (ValueError, OSError) as err:
            # Name the build: with a blend, "shards/shard-00000.bin: sha256 mismatch" alone does not say which.
            raise ValueError(str(err) if str(path) in str(err) else f"{path}: {err}") from err
        datasets.append((weight, reader))
        manifest = reader.manifest
        tokenizer_prints[path] = _manifest_field(manifest, "tokenizer.fingerprint", "tokenizer_fingerprint")
        encoder_prints[path] = _manifest_field(manifest, "vision_encoder.fingerprint", "vision_encoder_fingerprint",
                                               "vision_encoder")
        lengths[path] = reader.seq_length
        described[path] = (_describe_tokenizer(manifest), _describe_encoder(manifest))
    # One line naming the first build that differs from the first of the list (a blend of many builds listed
    # every fingerprint on its own line, in full, without saying which build was the odd one).
    first_path = weighted_paths[0][1]
    for index, (what, prints) in enumerate((("tokenizer", tokenizer_prints), ("vision encoder", encoder_prints))):
        for path, value in prints.items():
            if json_key(value) != json_key(prints[first_path]):
                raise ValueError(f"{path} was built with a different {what} ({described[path][index]}) than "
                                 f"{first_path} ({described[first_path][index]}): the builds of a blend must share "
                                 f"one {what}; rebuild {path} with the {what} of {first_path}")
    for path, length in lengths.items():
        if length != lengths[first_path]:
            raise ValueError(f"{path} has sequences of {length} tokens but {first_path} of {lengths[first_path]}: "
                             f"the builds of a blend must share one --seq-length; rebuild {path} with "
                             f"--seq-length {lengths[first_path]}")
    first = datasets[0][1]
    info = first.manifest.get("tokenizer") or {}
    tokenizer_dir = first.out_dir / info.get("dir", "tokenizer")
    if not tokenizer_dir.is_dir():
        tokenizer_dir = None
    vocab = None
    if all(k in info for k in ("base_vocab_size", "image_start_id", "image_end_id")):
        vocab = {k: int(info[k]) for k in ("base_vocab_size", "image_start_id", "image_end_id")}
        vocab["vocab_size"] = int(info.get("vocab_size", vocab["image_end_id"] + 1))
    elif tokenizer_dir is not None:
        from engine.tokenizer import load_saved_tokenizer

        tokenizer = load_saved_tokenizer(tokenizer_dir)
        vocab = {"base_vocab_size": tokenizer.base_vocab_size, "image_start_id": tokenizer.image_start_id,
                 "image_end_id": tokenizer.image_end_id, "vocab_size": tokenizer.vocab_size}
    refs = {"tokenizer_fingerprint": next(iter(tokenizer_prints.values())),
            "vision_encoder": _manifest_field(first.manifest, "vision_encoder"),
            "builds": [str(Path(p).resolve()) for _, p in weighted_paths]}
    return OpenedData(datasets=datasets, seq_length=first.seq_length, vocab=vocab, tokenizer_dir=tokenizer_dir,
                      manifest_refs=refs)


def _describe_tokenizer(manifest: dict) -> str:
    info = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    fingerprint = _manifest_field(manifest, "tokenizer.fingerprint", "tokenizer_fingerprint")
    parts = [str(info["type"])] if info.get("type") else []
    if info.get("vocab_size") is not None:
        parts.append(f"vocabulary {info['vocab_size']}")
    parts.append(f"fingerprint {str(fingerprint)[:12]}")
    return ", ".join(parts)


def _describe_encoder(manifest: dict) -> str:
    info = manifest.get("vision_encoder")
    if not isinstance(info, dict):
        return f"fingerprint {str(info)[:12]}"
    parts = [str(info.get("name"))]
    if info.get("decoder"):
        parts.append(f"decoder {info['decoder']}")
    parts.append(f"fingerprint {str(info.get('fingerprint'))[:12]}")
    return ", ".join(parts)


def json_key(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """Megatron's `_vocab_size_with_padding`: round up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple) if multiple > 1 else vocab_size
