"""Wrapped pipelines and the embedded tiny text-to-video model (``dit_accel.pipelines``)."""

from .tiny_video import load_tiny_video_pipeline

__all__ = ["load_tiny_video_pipeline"]
