"""The standalone trainer behind `train_tlora.py`: diffusers + transformers + accelerate around
the sd-scripts network module `networks.tlora`.

options (every option, declared once; no torch) -> preflight (all checks before a model loads)
-> loop.Trainer (models, data, optimizers, sampling, checkpoints, outputs) -> cli.main (exit
codes, one-line errors from errors.py). README.md, "The code", has one line per module."""
