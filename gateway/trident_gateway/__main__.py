"""`python -m trident_gateway serve ...` runs the gateway; `... keys create|revoke|list` manages API keys."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import keys
from .config import KEYS_ENV, MB, Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = Settings.from_env()
    settings.triton = args.triton or settings.triton
    settings.keys_file = args.keys or settings.keys_file
    settings.auth = not args.no_auth
    settings.cors_origins = args.cors_origin
    if args.max_image_mb is not None:
        settings.max_image_bytes = int(args.max_image_mb * MB)
    if args.max_audio_mb is not None:
        settings.max_audio_bytes = int(args.max_audio_mb * MB)
    if args.timeout is not None:
        settings.timeout = args.timeout
    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"trident_gateway: {exc}", file=sys.stderr)
        return 2
    access = logging.getLogger("trident_gateway.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))  # one JSON object a line
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    if not settings.auth:
        print("trident_gateway: --no-auth: the API is open to anyone who reaches it", file=sys.stderr)
    # uvicorn's own access log is off: ours (trident_gateway.access) carries the key's name
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level)
    return 0


def _keys(args: argparse.Namespace) -> int:
    path = args.keys or os.environ.get(KEYS_ENV)
    if not path:
        print(f"trident_gateway: give --keys FILE (or {KEYS_ENV})", file=sys.stderr)
        return 2
    try:
        if args.action == "create":
            print(keys.create(Path(path), args.name))  # shown once: only its hash is stored
        elif args.action == "revoke":
            keys.revoke(Path(path), args.name)
            print(f"revoked {args.name}")
        else:
            for entry in keys.load(Path(path)):
                state = f"revoked {entry.revoked}" if entry.revoked else "active"
                print(f"{entry.name}\tcreated {entry.created}\t{state}")
    except ValueError as exc:
        print(f"trident_gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trident_gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the REST gateway")
    serve.add_argument("--triton", help="Triton's gRPC address (default localhost:8001, TRIDENT_GATEWAY_TRITON)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--keys", type=Path, help=f"API keys file ({KEYS_ENV})")
    serve.add_argument("--no-auth", action="store_true", help="serve without API keys (anyone may call)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser calls from ORIGIN (repeatable; none: CORS off)")
    serve.add_argument("--max-image-mb", type=float, help="body limit of /v1/detect and /v1/ocr (default 20)")
    serve.add_argument("--max-audio-mb", type=float, help="body limit of /v1/transcribe (default 100)")
    serve.add_argument("--timeout", type=float, help="seconds each Triton call may take (default 120)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=_serve)
    manage = commands.add_parser("keys", help="create, revoke or list API keys")
    actions = manage.add_subparsers(dest="action", required=True)
    for action in ("create", "revoke", "list"):
        command = actions.add_parser(action)
        if action != "list":
            command.add_argument("name")
        command.add_argument("--keys", help=f"API keys file ({KEYS_ENV})")
    manage.set_defaults(run=_keys)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
