"""The embedded trained text-to-video model (a stock ``WanPipeline``), its procedural data and checks.

See docs/tiny_model.md. ``load_tiny_video_pipeline(device=...)`` loads it offline from the package's weights.
"""

from .model import TRAIN_COMMAND, WeightsNotFoundError, load_tiny_video_pipeline

__all__ = ["TRAIN_COMMAND", "WeightsNotFoundError", "load_tiny_video_pipeline"]
