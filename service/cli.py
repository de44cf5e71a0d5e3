"""lstm-serve: the server's command line (`python -m service.cli --help`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from service.config import ServerConfig, config_from_args
from service.errors import ConfigError
from service.logs import configure_logging
from service.server import create_server

log = logging.getLogger("service.cli")


async def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT has drained it; 1 if the models failed to load."""
    app, port = create_server(config)
    await app.start()
    log.info("listening", extra={"fields": {
        "grpc_port": port, "metrics_port": app.metrics_port, "host": config.host,
        "model_repository": str(config.model_repository),
    }})  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: _on_signal(app, s))
    try:
        await app.wait_until_loaded()
    except Exception:
        await app.shutdown(grace_s=0)
        return 1
    await app.wait_for_termination()
    return 0


def _on_signal(app: object, sig: signal.Signals) -> None:
    from service.server import LstmServer

    assert isinstance(app, LstmServer)
    log.info("signal", extra={"fields": {"signal": sig.name}})
    asyncio.get_running_loop().create_task(app.shutdown())


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lstm-serve` console script."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"lstm-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_json, config.log_level)
    try:
        return asyncio.run(serve(config))
    except ConfigError as exc:
        log.error("configuration error", extra={"fields": {"error": str(exc)}})
        return 2


if __name__ == "__main__":
    sys.exit(serve_main())
