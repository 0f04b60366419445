"""OpenAI Responses: the protocol's face (the same for every protocol: see ``adapters/__init__.py``).

``request``: client bodies to the IR and the IR to upstream bodies; ``response``: whole
answers, read from upstreams and rendered for clients; ``stream``: event streams, both
ways. Each mapping lives with its inverse (finish reasons, usage, blocks).
"""

from gateway.errors import OPENAI_RESPONSES as NAME

from .request import build_request, parse_request
from .response import parse_response, render_response
from .stream import StreamParser, StreamRenderer, stream_error

__all__ = [
    "NAME",
    "StreamParser",
    "StreamRenderer",
    "build_request",
    "parse_request",
    "parse_response",
    "render_response",
    "stream_error",
]
