"""The real-time demo: a local web app and JSON API for question answering and text generation.

`create_app` builds the ASGI app from already-loaded models; `canao serve`
(`canao.serve.command`) loads them and runs it under uvicorn.
"""

from .app import Limits, create_app

__all__ = ["Limits", "create_app"]
