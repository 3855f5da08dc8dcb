"""`python -m preprocess inspect OUT [--sequence K]`: a build's statistics, and one packed sequence decoded.

Decoded text shows each image block (`<image_start>`, 64 slots, `<image_end>`) as the literal `<image>` of the
input format, so a document reads back as its conversation rendered by the chat template; a legend under each
document gives every image's embedding row and whether it is a response (visual-loss target) image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from engine.data.manifest import build_dir_of, load_manifest
from engine.data.shards import PackedSequence, ShardReader
from engine.tokenizer.chat import IMAGE_PLACEHOLDER


def render_tokens(tokens: np.ndarray, slot_starts, tokenizer, tokens_per_image: int) -> str:
    """Decode `tokens`, writing `<image>` for each image block whose first slot is in `slot_starts`."""
    pieces, cursor = [], 0
    for slot in sorted(int(s) for s in slot_starts):
        block_start = slot - 1
        if block_start > cursor:
            pieces.append(tokenizer.decode(tokens[cursor:block_start].tolist()))
        pieces.append(IMAGE_PLACEHOLDER)
        cursor = slot + tokens_per_image + 1
    if cursor < len(tokens):
        pieces.append(tokenizer.decode(tokens[cursor:].tolist()))
    return "".join(pieces)


def document_texts(sequence: PackedSequence, tokenizer, tokens_per_image: int) -> list[str]:
    """The decoded text of every document of a packed sequence (padding excluded)."""
    texts = []
    bounds = sequence.document_bounds
    for start, end in zip(bounds[:-1], bounds[1:]):
        slots = [s - start for s in sequence.image_slot_starts if start <= s < end]
        texts.append(render_tokens(sequence.tokens[start:end], slots, tokenizer, tokens_per_image))
    return texts


def print_summary(manifest: dict, file=None) -> None:
    file = file or sys.stdout
    counts = manifest["counts"]
    encoder = manifest["vision_encoder"]
    print(f"format_version {manifest['format_version']}, seq_length {manifest['seq_length']}, "
          f"chat template {manifest['chat_template']}", file=file)
    print(f"tokenizer: {manifest['tokenizer']['type']}, vocab {manifest['tokenizer']['vocab_size']}, "
          f"fingerprint {manifest['tokenizer']['fingerprint'][:16]}", file=file)
    print(f"vision encoder: {encoder.get('name')} (decoder {encoder.get('decoder', '-')}, fingerprint "
          f"{(encoder.get('fingerprint') or '-')[:16]})", file=file)
    for key in ("samples_read", "samples_written", "sequences", "documents", "images", "unique_images", "tokens"):
        print(f"  {key:16s} {counts[key]}", file=file)
    print(f"  {'truncated':16s} {manifest['truncated']}", file=file)
    print(f"packing efficiency {manifest['packing_efficiency']:.2%} ({counts['tokens']} real tokens in "
          f"{counts['sequences']} x {manifest['seq_length']} slots)", file=file)
    skipped = manifest["skipped"]
    print(f"skipped {sum(skipped.values())}" + "".join(f"\n  {k:28s} {v}" for k, v in skipped.items()), file=file)
    print(f"shards {len(manifest['shards'])}, embedding rows {manifest['embeddings']['rows']} in "
          f"{len(manifest['embeddings']['segments'])} segments", file=file)


def print_sequence(reader: ShardReader, index: int, file=None) -> None:
    file = file or sys.stdout
    from engine.tokenizer import load_saved_tokenizer

    out, manifest = reader.out_dir, reader.manifest
    tokenizer = load_saved_tokenizer(out / manifest["tokenizer"]["dir"])
    shard, local = reader.locate(index)
    sequence = reader.sequence(shard, local)
    per_image = manifest["tokens_per_image"]
    provenance = {}
    with open(out / manifest["shards"][shard]["documents"], encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            if entry["sequence"] == local:
                provenance[entry["document"]] = entry
    bounds = sequence.document_bounds
    print(f"sequence {index} (shard {manifest['shards'][shard]['index']}, #{local}): {len(bounds) - 1} documents, "
          f"{int(bounds[-1])} real tokens, {int(sequence.loss_mask.sum())} loss targets, "
          f"{len(sequence.image_rows)} images", file=file)
    for doc, text in enumerate(document_texts(sequence, tokenizer, per_image)):
        start, end = int(bounds[doc]), int(bounds[doc + 1])
        source = provenance.get(doc, {})
        print(f"\n=== document {doc}: tokens {start}..{end - 1}, from {source.get('file')}:{source.get('line')} "
              f"id={source.get('id')}{' (truncated)' if source.get('truncated') else ''}", file=file)
        print(text, file=file)
        in_doc = [(int(s), int(r), bool(p)) for s, r, p in zip(sequence.image_slot_starts, sequence.image_rows,
                                                               sequence.image_is_response) if start <= s < end]
        for number, (slot, row, response) in enumerate(in_doc):
            print(f"  <image> #{number}: embedding row {row}, {'response (target)' if response else 'prompt'}, "
                  f"slots {slot}..{slot + per_image - 1}", file=file)
    padding = reader.seq_length - int(bounds[-1])
    if padding:
        print(f"\n=== padding: {padding} tokens", file=file)


def inspect_build(path: str | Path, sequence: int | None = None, file=None) -> None:
    """Print a build's statistics (and sequence `sequence`, decoded).

    Raises:
        ManifestError: no such directory, not a finished build, or a file that is missing, of the wrong size
            or not in the format (a corrupt `.idx`, named): the CLI prints it as one line, exit status 2.
    """
    file = file or sys.stdout
    out = build_dir_of(path)
    manifest = load_manifest(out, check_sha256=False)
    reader = ShardReader(out)  # opens every stream's index: a corrupt one is reported here, by name
    print_summary(manifest, file)
    if sequence is not None:
        print("", file=file)
        print_sequence(reader, sequence, file)
