"""dit_accel: training-free sparse attention for diffusers' diffusion transformers."""

__version__ = "0.1.0"
