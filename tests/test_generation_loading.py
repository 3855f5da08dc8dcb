"""The prompt encoder of generation takes the features preprocess took (layer, post_layernorm)."""

from __future__ import annotations

import dataclasses

import pytest

from engine.generation.loading import build_prompt_encoder
from engine.vision_encoder import describe_vision_encoder


@pytest.mark.parametrize(("layer", "post_layernorm"), [(-1, False), (-2, False), (-1, True)])
def test_prompt_encoder_uses_the_recorded_feature_layer(layer: int, post_layernorm: bool) -> None:
    reference = dataclasses.asdict(describe_vision_encoder("tiny-random", device="cpu", dtype="float32",
                                                           decoder="pil", feature_layer=layer,
                                                           post_layernorm=post_layernorm))
    encoder = build_prompt_encoder(reference, None, "cpu")
    assert (encoder.feature_layer, encoder.post_layernorm) == (layer, post_layernorm)
    assert encoder.fingerprint() == reference["fingerprint"]
