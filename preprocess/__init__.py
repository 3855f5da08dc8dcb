"""Offline preprocessing: LLaVA-style records -> packed Megatron shards with precomputed SigLIP embeddings.

`python -m preprocess {build,inspect,verify}`; training reads the output with `preprocess.shards.ShardReader`.
See docs/preprocess.md (usage) and docs/data_format.md (the on-disk format).
"""
