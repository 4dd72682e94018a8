"""The standalone trainer behind `train_tlora.py`: diffusers + transformers + accelerate around
the sd-scripts network module `networks.tlora`."""
