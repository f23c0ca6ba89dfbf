"""``npr serve``: the NPR engine behind the OpenAI API, with a live branch view at ``/``.

- ``protocol``: the request bodies accepted and the OpenAI error object;
- ``loop``: the one thread that steps the engine for every client;
- ``stream``: engine deltas -> canonical content, branch text, stop strings, log-probs;
- ``responses``: OpenAI JSON / SSE shapes, the ``npr`` extension, disconnect handling;
- ``app``: routes, auth, limits; ``page``: the chat page.

docs/serving.md documents the API.
"""

from npr.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
