r"""An OpenAI-compatible HTTP server on one jpaged engine (Starlette + uvicorn).

    python -m jpaged.serve --model smollm2-135m --port 8000
    curl localhost:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'

Endpoints: POST /v1/completions and /v1/chat/completions (with "stream":
true, server-sent events: one chunk per engine step, then "data: [DONE]"),
GET /v1/models, GET /health, GET /metrics (Prometheus text format).
The app is jpaged.openai_server.OpenAIServer; this module runs it.

Shutdown (Ctrl-C, SIGTERM): no new connections; running requests get
--shutdown-timeout seconds to finish, then are aborted; the engine loop
stops. A second Ctrl-C quits at once.
"""
from __future__ import annotations

import argparse
import logging
import socket
import threading
import time

from jpaged.openai_server import OpenAIServer, ServerConfig

__all__ = ["OpenAIServer", "ServerConfig", "ServerThread", "main", "parse_args"]

logger = logging.getLogger("jpaged.serve")


class ServerThread:
    """The server on a background thread of this process (tests, benchmarks):
    ``with ServerThread(server) as url: ...`` (url: "http://host:port";
    server.config's port 0 takes any free port)."""

    def __init__(self, server: OpenAIServer):
        import uvicorn
        host = server.config.host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, server.config.port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            server.app, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=server.config.shutdown_timeout))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs=dict(sockets=[self.sock]),
                                       name="jpaged-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        """Shuts down as on Ctrl-C: requests get shutdown_timeout seconds."""
        self.uvicorn.should_exit = True
        self.thread.join(self.uvicorn.config.timeout_graceful_shutdown + 60)
        if self.thread.is_alive():
            raise RuntimeError("the HTTP server did not shut down")


def parse_args(argv=None):
    from jpaged.engine_args import add_engine_args, check_one_replica
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, max_num_seqs_help="most sequences in one step (default: "
                    "EngineConfig's); every batch-size bucket up to it is compiled at start-up")
    s = p.add_argument_group("server")
    d = ServerConfig
    s.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every "
                   "interface; mind --api-key then)")
    s.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    s.add_argument("--api-key", default=d.api_key,
                   help="require 'Authorization: Bearer <key>' on /v1/* (default: none)")
    s.add_argument("--served-model-name", default=d.served_model_name,
                   help="the model name clients send and /v1/models lists (default: --model)")
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests held beyond a full batch of --max-num-seqs; more get "
                        "HTTP 503 (bounded memory under a burst)")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds running requests get to finish on Ctrl-C / SIGTERM "
                        "before they are aborted")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    s.add_argument("--no-progress", action="store_true", help="hide the warm-up progress bar")
    args = p.parse_args(argv)
    check_one_replica(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              served_model_name=args.served_model_name or args.model,
                              max_queued_requests=args.max_queued_requests,
                              shutdown_timeout=args.shutdown_timeout)
    except ValueError as e:
        raise SystemExit(f"server flags: {e}")
    import uvicorn
    from jpaged import LLM
    from jpaged.engine_args import llm_kwargs, load_model
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(load_model(args), use_tqdm_warmup=not args.no_progress, **llm_kwargs(args))
    server = OpenAIServer(llm, config)
    logger.info("serving %r (max_model_len %d, max_num_seqs %d) at http://%s:%d/v1",
                server.model_name, server.limits["max_model_len"],
                server.limits["max_num_seqs"], config.host, config.port)
    uvicorn.run(server.app, host=config.host, port=config.port, log_level=args.log_level,
                timeout_graceful_shutdown=config.shutdown_timeout)


if __name__ == "__main__":
    main()
