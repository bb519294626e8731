"""The Gradio demo (``dit_accel.demo``): dense and accelerated renders side by side, in a browser.

    dit-accel demo [--port N] [--host ADDRESS] [--model PATH] [--device auto|cpu|cuda]

Needs the ``demo`` extra (``pip install "dit-accel[demo]"``: gradio, imageio, imageio-ffmpeg). Modules:
:mod:`.app` (the page, ``launch``), :mod:`.engine` (loading, rendering, one job at a time),
:mod:`.requests` (checks of a request), :mod:`.pictures` (the attention pictures), :mod:`.launch` (the
command's arguments). Importing this package does not import gradio.
"""
