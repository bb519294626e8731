"""Wrapped pipelines with presets (``dit_accel.pipelines``), the embedded tiny text-to-video model and the
quality harness.

    from dit_accel import pipelines

    pipe = pipelines.from_pretrained("embedded", preset="balanced")      # or a folder, or a hub id
    pipe = pipelines.wrap(existing_pipe, preset="fast", density=0.08)    # a pipeline already built
    pipe.compile()                                                       # optional: torch.compile blocks
    out = pipe(prompt="...", num_inference_steps=30)                     # the pipeline's own arguments
    result = pipe.compare(prompt="...", seed=0)                          # dense vs accelerated, same seed
    stock = pipe.remove()

Presets per model family, with their measured numbers: :mod:`dit_accel.pipelines.presets`, docs/pipelines.md.
"""

from .presets import PRESET_NAMES, Preset, Settings
from .tiny_video import load_tiny_video_pipeline
from .wrapped import AcceleratedPipeline, Comparison, from_pretrained, load_pipeline, wrap

__all__ = [
    "PRESET_NAMES",
    "AcceleratedPipeline",
    "Comparison",
    "Preset",
    "Settings",
    "from_pretrained",
    "load_pipeline",
    "load_tiny_video_pipeline",
    "wrap",
]
