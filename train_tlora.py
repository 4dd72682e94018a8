#!/usr/bin/env python
"""train_tlora.py: train T-LoRA / Ortho-LoRA / TriLoRA / LoRA with diffusers + accelerate, using
the sd-scripts network module `networks.tlora`; sd-scripts' argument names and config files.

    python train_tlora.py --config_file presets/demo.toml          # no downloads, ~4 minutes on a 2-core CPU
    accelerate launch train_tlora.py --config_file presets/tlora-object-sdxl.toml \\
        --pretrained_model_name_or_path /models/sdxl-base --train_data_dir data/dog.png \\
        --instance_prompt "a photo of sks dog" --output_dir out

The trainer is the package `tlora_trainer/` (options, data, models, checkpoints, sampling, loop,
cli); this file is the command. `python train_tlora.py --help` lists every option.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:  # `networks/` (namespace package), `converters/` and `tlora_trainer/` live beside this file
    sys.path.insert(0, ROOT)

from tlora_trainer.cli import main, run  # noqa: E402
from tlora_trainer.errors import EXIT_BAD_INPUT, EXIT_NOT_FINITE  # noqa: E402,F401  (exit codes, for callers)

__all__ = ["main", "run", "EXIT_BAD_INPUT", "EXIT_NOT_FINITE"]

if __name__ == "__main__":
    sys.exit(main())
