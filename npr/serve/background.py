"""Serve an app from a background thread (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(engine, ServeConfig(model_name="m"))) as server:
        OpenAI(base_url=server.url + "/v1", api_key="none").chat.completions.create(...)

Binds 127.0.0.1 on a free port. Leaving the block stops uvicorn and the engine loop (the app's
lifespan cancels whatever is still running).
"""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="npr-serve-background", daemon=True
        )

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        api = getattr(self.server.config.app.state, "api", None)
        if api is not None:  # end open streams now instead of after uvicorn's graceful timeout
            api.loop.drain(0.0)
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
