"""A server in a background thread of this process, for tests and benchmarks.

::

    with ServerThread(sampler, ServeConfig(port=0)) as running:
        openai.OpenAI(base_url=running.url + "/v1", api_key="none")...

The server is the real one (:class:`charrnn.serve.app.Server` on uvicorn, with its
protocol class and limits) on a real loopback socket; only the process is shared.
"""

from __future__ import annotations

import signal
import threading
import time

from ..generation.chat import ChatTemplate
from ..generation.sampler import Sampler
from .app import Server, listen, uvicorn_server
from .settings import ServeConfig

START_TIMEOUT = 30.0  # seconds for uvicorn to start on a busy machine


class ServerThread:
    """A :class:`~charrnn.serve.app.Server` running in a daemon thread: ``url`` and ``port``
    to call it, :attr:`server` to look inside, then :meth:`stop` (or use it as a context manager)."""

    def __init__(self, sampler: Sampler, config: ServeConfig | None = None, template: ChatTemplate | None = None):
        self.server = Server(sampler, config, template)
        config = self.server.config
        self.socket = listen(config.host, config.port, config.backlog)
        self.port: int = self.socket.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self._uvicorn = uvicorn_server(self.server)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop uvicorn as SIGTERM does (generations under way answer 503, for at most 2 s), then the threads."""
        self._uvicorn.handle_exit(signal.SIGTERM, None)
        self._thread.join(30)
        self.server.close()
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
