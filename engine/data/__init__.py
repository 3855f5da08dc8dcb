"""The on-disk data format that training reads and `preprocess` writes (docs/data_format.md).

    engine.data.records          LLaVA-style input records: streaming JSONL / JSON-array reading, validation
    engine.data.image_source     where image bytes come from (files, WebDataset tars), confined to a root
    engine.data.image_decode     bytes -> pixels (PIL, NVIDIA DALI on CPU or GPU)
    engine.data.manifest         manifest.json: checksums, format version, loading
    engine.data.indexed_dataset  Megatron IndexedDataset .bin/.idx, written and read
    engine.data.shards           the build layout, shard and embedding writers, `ShardReader`

Nothing here imports `preprocess`: the preprocessor is a tool on top of this format, the way Megatron-LM's
tools/preprocess_data.py sits on megatron-core's indexed_dataset.
"""
