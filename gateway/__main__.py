"""CLI: `python -m gateway [--config PATH] [--host H] [--port P]` and `python -m gateway check`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gateway.config import ConfigError, load_config
from gateway.redact import mask
from gateway.routing import build_route

DEFAULT_PORT = 3333


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="OpenAI-compatible gateway in front of many model backends.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""other environment variables:
  GATEWAY_ADMIN_KEY  when set, /debug and /reload need 'Authorization: Bearer <key>'
  ALLOW_ORIGINS      comma-separated CORS origins (overrides the file's allowOrigins)
  GATEWAY_DRAIN_TIMEOUT  seconds in-flight requests get to finish on SIGTERM (default 30)
  LOG_FORMAT         json or console (default: json unless stderr is a terminal)
  LOG_LEVEL          default INFO""",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "check"),
        default="serve",
        help="serve (default) or check: validate the config file and print its models",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("GATEWAY_CONFIG", "config.json"),
        help="endpoint map, JSON or YAML (env GATEWAY_CONFIG; default config.json)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GATEWAY_HOST", "0.0.0.0"),
        help="address to bind (env GATEWAY_HOST; default 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GATEWAY_PORT", DEFAULT_PORT)),
        help=f"port (env GATEWAY_PORT; default {DEFAULT_PORT})",
    )
    return parser


def check(path: str) -> int:
    """Like `nginx -t`: a line per model when the file is valid, the errors and exit 1 when not."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid", file=sys.stderr)
        for line in exc.errors:
            print(f"  {path}: {line}", file=sys.stderr)
        return 1
    for public_id, endpoint in config.endpoints.items():
        if not endpoint.enabled:
            print(f"{public_id}\t(disabled)")
            continue
        route = build_route(public_id, endpoint, config)
        backends = [
            f"{t.base_url} model={t.model or '(as sent, prefix stripped)'} "
            f"key={mask(t.api_key) or '(none)'}"
            for t in route.targets
        ]
        if len(backends) == 1:
            print(f"{public_id}\t{route.display_name!r} -> {backends[0]}")
        else:
            print(f"{public_id}\t{route.display_name!r} ({route.strategy}):")
            for line in backends:
                print(f"  -> {line}")
    enabled = sum(endpoint.enabled for endpoint in config.endpoints.values())
    print(f"{path}: ok, {enabled} model(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return check(args.config)
    from gateway.app import build_app
    from gateway.server import DEFAULT_DRAIN_TIMEOUT, serve_forever
    from gateway.state import Settings

    origins = os.environ.get("ALLOW_ORIGINS")
    settings = Settings(
        admin_key=os.environ.get("GATEWAY_ADMIN_KEY") or None,
        allow_origins=None
        if origins is None
        else tuple(o.strip() for o in origins.split(",") if o.strip()),
    )
    try:
        app = build_app(args.config, settings)
    except ConfigError as exc:
        print(f"{args.config}: invalid config, not starting", file=sys.stderr)
        for line in exc.errors:
            print(f"  {args.config}: {line}", file=sys.stderr)
        return 1
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    drain = float(os.environ.get("GATEWAY_DRAIN_TIMEOUT") or DEFAULT_DRAIN_TIMEOUT)
    asyncio.run(serve_forever(app, args.host, args.port, drain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
