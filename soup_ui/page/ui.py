"""The Gradio page, assembled: the main panels (`panels.py`), the workflow tabs (`tabs.py`) and the
HTTP API (`api.py`), over the plain handlers of `session.py`, one session state per visitor."""

from __future__ import annotations

import gradio as gr

from .api import build_api
from .panels import Page, declare_blocks, declare_header, declare_images, declare_methods, declare_settings, declare_shards, wire_blocks, wire_mix, wire_preset
from .parts import CSS, JS, block_line, restored, user_errors, with_eta
from .session import MAX_SHARDS, StudioHost
from .tabs import build_tabs

__all__ = ["StudioHost", "build_ui", "launch", "MAX_SHARDS", "block_line", "restored", "user_errors", "with_eta"]


def build_ui(host: StudioHost) -> gr.Blocks:
    """Declare the page and wire its events; `host` provides the studios, `session.py` the logic."""
    with gr.Blocks(title="Diffusion Soup Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        p = Page(host)
        p.demo = demo
        declare_header(p)
        with gr.Row():
            with gr.Column(scale=1):
                declare_shards(p)
                declare_blocks(p)
                declare_methods(p)
            with gr.Column(scale=1):
                declare_settings(p)
        declare_images(p)
        p.collect()
        wire_preset(p)
        wire_mix(p)
        wire_blocks(p)
        build_tabs(p)
        build_api(host, p.state)
    return demo


def launch(demo: gr.Blocks, port: int | None = None, share: bool = False, max_file_size: str | int | None = "16gb", **kwargs):
    """Serve on 127.0.0.1 only, with no share link unless asked; uploads above `max_file_size` are refused."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name="127.0.0.1", server_port=port, share=share, css=CSS, js=JS, show_error=True, max_file_size=max_file_size, **kwargs
    )
