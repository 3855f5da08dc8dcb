"""The build's manifest.json, assembled by rank 0 from the parts and written last, and the summary printed
at the end of a build. The format and its checks are `engine.data.manifest` (re-exported here)."""

from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from engine.config import TOKENS_PER_IMAGE, VISION_DIM
from engine.data.atomic import save_npy_atomic, write_bytes_atomic
from engine.data.manifest import (  # noqa: F401 (re-exported)
    FORMAT_VERSION,
    MANIFEST_NAME,
    ManifestError,
    build_dir_of,
    check_manifest_bytes,
    load_manifest,
    serialize_manifest,
    sha256_file,
)
from engine.data.latents import latent_segment_path
from engine.data.shards import segment_path, shard_prefix
from preprocess.build_state import BUILD_STATE
from preprocess.shard_builder import PARTS_DIR

COUNT_KEYS = ("samples_read", "samples_written", "sequences", "documents", "images", "unique_images", "tokens")


def write_manifest(out: Path, config, state: dict, tokenizer, summaries: list[dict], keeps: list[list[int]],
                   row_hashes: list[str], files: dict[str, list]) -> dict:
    """embeddings/index.npy, rejects.jsonl, then manifest.json (last); removes parts/ and build.json."""
    counts = collections.Counter()
    skipped = collections.Counter()
    shards, segments = [], []
    index_rows = []
    for summary, keep in zip(summaries, keeps):
        shard = summary["shard"]
        counts.update({key: value for key, value in summary["counts"].items() if key != "unique_images"})
        skipped.update(summary["skipped"])
        files.update(summary["files"])
        if keep:
            for row, _ in enumerate(keep):
                index_rows.append((len(segments), row))
            segments.append({"path": segment_path(shard), "rows": len(keep), "shard": shard})
        # An empty shard (every record rejected) gets no streams: megatron cannot memory-map empty files.
        if summary["counts"].get("sequences", 0):
            prefix = shard_prefix(shard)
            shards.append({
                "index": shard, "tokens": prefix, "loss_mask": f"{prefix}.loss_mask",
                "doc_bounds": f"{prefix}.doc_bounds", "images": f"{prefix}.images",
                "image_rows": f"{prefix}.image_rows.npy", "documents": f"{prefix}.documents.jsonl",
                "counts": {key: summary["counts"].get(key, 0) for key in COUNT_KEYS},
            })
    index = np.zeros(len(row_hashes), dtype=[("segment", "<i4"), ("row", "<i8"), ("sha256", "S32")])
    if row_hashes:
        index["segment"] = [segment for segment, _ in index_rows]
        index["row"] = [row for _, row in index_rows]
        index["sha256"] = [bytes.fromhex(digest) for digest in row_hashes]
    save_npy_atomic(out / "embeddings" / "index.npy", index)
    rejects = "".join(_json_line(entry) for summary in summaries for entry in summary["rejects"])
    write_bytes_atomic(out / "rejects.jsonl", rejects.encode("utf-8"))
    for relative in ["embeddings/index.npy", "rejects.jsonl"] + \
            sorted(str(p.relative_to(out)) for p in (out / "tokenizer").iterdir()):
        files[relative] = [sha256_file(out / relative), (out / relative).stat().st_size]
    counts["unique_images"] = len(row_hashes)
    sequences = counts["sequences"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_length": config.seq_length,
        "tokens_per_image": TOKENS_PER_IMAGE,
        "vision_dim": VISION_DIM,
        "chat_template": config.chat_template,
        "settings": state["settings"],
        "inputs": state["inputs"],
        "tokenizer": {
            "dir": "tokenizer", "type": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "base_vocab_size": tokenizer.base_vocab_size,
            "image_start_id": tokenizer.image_start_id, "image_end_id": tokenizer.image_end_id,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        },
        "vision_encoder": state["vision_encoder"],
        "shards": shards,
        "embeddings": {"dtype": "bfloat16", "row_shape": [TOKENS_PER_IMAGE, VISION_DIM], "rows": len(row_hashes),
                       "index": "embeddings/index.npy", "segments": segments},
        **({"latents": latents_entry(config.vae_info, len(row_hashes), segments)} if config.vae_info else {}),
        "counts": {key: int(counts.get(key, 0)) for key in COUNT_KEYS},
        "truncated": int(counts.get("truncated", 0)),
        "pil_fallback_images": int(counts.get("pil_fallback_images", 0)),
        "padding_tokens": int(sequences * config.seq_length - counts["tokens"]),
        "packing_efficiency": round(counts["tokens"] / (sequences * config.seq_length), 6) if sequences else 0.0,
        "skipped": dict(sorted(skipped.items())),
        "rejects": "rejects.jsonl",
        "sha256": {relative: files[relative][0] for relative in sorted(files)},
        "bytes": {relative: files[relative][1] for relative in sorted(files)},
    }
    write_bytes_atomic(out / MANIFEST_NAME, serialize_manifest(manifest))
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def latents_entry(vae: dict, rows: int, segments: list[dict]) -> dict:
    """`manifest.latents` (engine/data/latents.py): one latent segment per embedding segment, same rows."""
    return {"dtype": "bfloat16", "row_shape": list(vae["row_shape"]), "rows": rows,
            "index": "embeddings/index.npy", "vae": {k: v for k, v in vae.items() if k != "path"},
            "segments": [{"path": latent_segment_path(s["shard"]), "rows": s["rows"], "shard": s["shard"]}
                         for s in segments]}


def _json_line(entry: dict) -> str:
    return json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def summary_lines(out: Path, manifest: dict, summaries: list[dict], seconds: float) -> list[str]:
    """What a finished build prints: the first rejects, what was built, and how fast (stderr)."""
    lines = []
    shown = 0
    for summary in summaries:
        for entry in summary["rejects"]:
            if shown < 20:
                lines.append(f"skipped {entry['file']}:{entry['line']}: {entry['reason']}: {entry['message']}")
            shown += 1
    if shown > 20:
        lines.append(f"... and {shown - 20} more skipped records, see {out / 'rejects.jsonl'}")
    counts = manifest["counts"]
    skipped = manifest["skipped"]
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        skip_text = f"{sum(skipped.values())} skipped ({reasons}; see {out / 'rejects.jsonl'})"
    else:
        skip_text = "none skipped"
    lines.append(f"built {out}: {counts['sequences']} sequences of {manifest['seq_length']} tokens from "
                 f"{counts['samples_written']} of {counts['samples_read']} records, {skip_text}")
    encoder = manifest["vision_encoder"]
    images = f"{counts['images']} images ({counts['unique_images']} unique)"
    if counts["images"]:
        images += f" embedded by {encoder.get('name')} (decoder {encoder.get('decoder', '-')})"
    lines.append(f"  {counts['tokens']:,} tokens, packing efficiency {manifest['packing_efficiency']:.2%}, "
                 f"{manifest['truncated']} truncated; {images}")
    seconds = max(seconds, 1e-6)
    lines.append(f"  {seconds:.1f} s: {_rate(counts['samples_read'] / seconds)} records/s, "
                 f"{_rate(counts['tokens'] / seconds)} tokens/s, {_rate(counts['images'] / seconds)} images/s")
    return lines


def print_summary(out: Path, manifest: dict, summaries: list[dict], seconds: float) -> None:
    for line in summary_lines(out, manifest, summaries, seconds):
        print(line, file=sys.stderr)
