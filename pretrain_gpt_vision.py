"""Entry point for VPiT pretraining (`torchrun ... pretrain_gpt_vision.py`). The training loop is being built
(issue 4); until it lands this only validates the model flags and prints the model size."""

import argparse
import sys

from engine.config import add_model_args, model_config_from_args

if __name__ == "__main__":
    args = add_model_args(argparse.ArgumentParser()).parse_args()
    try:
        config = model_config_from_args(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(config)
