"""`prefixtune serve`: its flags, and the server run (the engine from serving.backends, the app from serving.api)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ..extras import require
from .backend import add_backend_arg, require_backend


def add_serve_args(p) -> None:
    p.add_argument("--model", required=True, help="base model: a directory, a .gguf file, or a hub id already in the local cache")
    add_backend_arg(p)
    p.add_argument("--dtype", default="auto", help="torch and vllm backends: auto (bf16 on a GPU, fp32 on CPU), fp32, bf16, "
                   "fp16")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="vllm backend: split the model over N devices (GPUs; on CPUs N worker processes), each holding "
                   "its share of the KV heads and of every adapter's prefix (docs/serving-vllm.md)")
    p.add_argument("--device", default=None, help="torch backend: cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="a training run directory (`train --output`: its final adapter, named after the run), one adapter "
                   "directory, or a directory of runs and adapters (one adapter each, named after its subdirectory; "
                   "never a run's checkpoints). Indexed at start-up, each loads on its first request (POST "
                   "/v1/adapters/rescan finds new ones); the names are logged at start-up")
    p.add_argument("--best", action="store_true",
                   help="training runs serve their best adapter by eval score (best/) instead of their final one")
    p.add_argument("--max-loaded-adapters", type=int, default=None, metavar="N",
                   help="adapters kept in memory at once; the least recently used idle one is evicted (default: no limit)")
    p.add_argument("--adapter-memory", default=None, metavar="SIZE",
                   help="memory budget of the resident adapters, e.g. 512MB or 2GiB (default: no limit)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME",
                   help="keep this adapter loaded from start-up on, never evicted (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-total-tokens", type=int, default=None, help="prompt + max_tokens (default: the model's context)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--graceful-timeout", type=float, default=None, help="seconds to wait for in-flight requests on shutdown")


def run_server(model_path: str, adapters_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               backend: str = "torch", **limits) -> None:
    import uvicorn

    from ..serving.api import create_app
    from ..serving.backends import build_backend

    logging.basicConfig(level=logging.INFO)  # a no-op under cli.main, which configured logging already:
    logging.getLogger("prefixtune").setLevel(logging.INFO)  # so our start-up lines (adapter names) are shown anyway
    graceful = limits.pop("graceful_timeout", None)
    engine = build_backend(backend, model_path, adapters_dir, **limits)
    try:
        say_adapters(engine, adapters_dir)
        # uvicorn on SIGINT/SIGTERM: stop accepting, let open requests finish (up to --graceful-timeout), then the
        # app's lifespan drains and closes the engine with every process it started.
        app = create_app(engine)
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=graceful, log_level="info")
        _server_class(uvicorn)(config, app).run()
    finally:
        engine.close()  # again (a no-op) after a clean shutdown; the one close when uvicorn failed to start (port taken)


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, plus: requests still open shortly before --graceful-timeout runs out end with a clear
        error (503, in-band for a stream, then [DONE]) instead of a connection uvicorn cuts without a word."""

        def __init__(self, config, app):
            super().__init__(config)
            self.app = app

        async def shutdown(self, sockets=None):
            timeout = self.config.timeout_graceful_shutdown
            if timeout is not None:
                from ..serving.errors import EngineStopped

                error = EngineStopped(f"the server is shutting down and stopped this request after the {timeout:g} s "
                                      "--graceful-timeout; retry it")
                # Half the timeout (at most 1 s) before the cut: time for the error to reach the client.
                asyncio.get_running_loop().call_later(timeout - min(timeout / 2, 1.0),
                                                      self.app.state.completions.abort_in_flight, error)
            await super().shutdown(sockets)

    return Server


def say_adapters(engine, adapters_dir: str | None, shown: int = 20) -> None:
    """At start-up: the name each adapter is served under (the `model` of a request) and where it comes from."""
    entries = engine.registry.entries(on_disk=True)
    log = logging.getLogger("prefixtune.serve")
    if engine.registry.indexing:  # a large directory: the names come as the background index reads them
        log.info("--adapters %s: indexing in the background; any adapter in it can be requested by name now, and "
                 "GET /v1/models lists them as they are indexed", adapters_dir)
    elif adapters_dir is not None and not entries:
        log.warning("--adapters %s: no adapter found (expected a training run, an adapter directory, or a directory "
                    "of them); serving the base model only", adapters_dir)
    else:
        for e in entries[:shown]:
            log.info("adapter %r <- %s%s", e.name, e.directory, f" (unusable: {e.problem})" if e.problem else "")
        if len(entries) > shown:
            log.info("... and %d more adapters (GET /v1/models lists them all)", len(entries) - shown)
    log.info("base model %r: requests with model=%r use no adapter", engine.model_name, engine.model_name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefixtune serve", description="OpenAI-compatible server for one base model + adapters")
    add_serve_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`prefixtune serve ...` (cli.main hands us the arguments after 'serve')."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensor_parallel_size is not None and args.backend != "vllm":
        parser.error(f"--tensor-parallel-size is for --backend vllm (not {args.backend}); drop it or use --backend vllm")
    require("serve", "")  # printed after "prefixtune serve: error:"
    require_backend(args.backend)
    kw = {"torch": dict(dtype=args.dtype, device=args.device),
          "vllm": dict(dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size or 1)}.get(args.backend, {})
    run_server(args.model, args.adapters, host=args.host, port=args.port, backend=args.backend, **kw,
               max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
               max_total_tokens=args.max_total_tokens, request_timeout=args.timeout,
               graceful_timeout=args.graceful_timeout, max_loaded_adapters=args.max_loaded_adapters,
               adapter_memory=args.adapter_memory, pin=tuple(args.pin), best_adapters=args.best)
    return 0
