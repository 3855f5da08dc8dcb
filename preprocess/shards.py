"""The shard format lives in `engine.data.shards`; these names stay importable from here for existing code
(`from preprocess.shards import ShardReader`)."""

from engine.data.shards import (  # noqa: F401
    EMBEDDING_DIR,
    IMAGE_FIELDS,
    ROW_BYTES,
    ROW_SHAPE,
    SHARD_DIR,
    SIDE_STREAMS,
    EmbeddingPartWriter,
    PackedSequence,
    ShardReader,
    ShardWriter,
    replace_atomic,
    save_npy_atomic,
    segment_path,
    shard_files,
    shard_prefix,
    write_bytes_atomic,
)
