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
    if args.body_timeout is not None:
        settings.body_timeout = args.body_timeout
    if args.data_dir is not None:
        settings.data_dir = args.data_dir
    if args.max_jobs is not None:
        settings.max_jobs = args.max_jobs
    settings.jobs = settings.jobs and not args.no_jobs
    for name in ("triton_root_cert", "triton_client_cert", "triton_client_key", "ssl_certfile", "ssl_keyfile"):
        setattr(settings, name, getattr(args, name) or getattr(settings, name))
    settings.triton_ssl = args.triton_ssl or settings.triton_ssl
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
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level,
                ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
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
    serve.add_argument("--body-timeout", type=float, help="seconds a request body may send nothing before it is "
                       "refused with 408 (default 60; TRIDENT_GATEWAY_BODY_TIMEOUT)")
    serve.add_argument("--data-dir", type=Path, help="analysis jobs' uploads, results and SQLite state (default: "
                       "a temporary folder; TRIDENT_GATEWAY_DATA): give a persistent one in production")
    serve.add_argument("--max-jobs", type=int, help="analysis jobs run at once, the others queued (default 2)")
    serve.add_argument("--no-jobs", action="store_true",
                       help="answer /v1/analyze and /v1/jobs 404: another gateway serves the jobs "
                            "(TRIDENT_GATEWAY_JOBS=0; behind several replicas, as in deploy/kubernetes)")
    serve.add_argument("--log-level", default="info")
    tls = serve.add_argument_group("TLS", "PEM files; each option also from TRIDENT_GATEWAY_<OPTION> (e.g. "
                                   "TRIDENT_GATEWAY_SSL_CERTFILE). A restricted model-repository API's key (for "
                                   "/readyz): TRIDENT_ADMIN_KEY")
    tls.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (chain)")
    tls.add_argument("--ssl-keyfile", help="and this private key")
    tls.add_argument("--triton-ssl", action="store_true", help="reach Triton's gRPC over TLS")
    tls.add_argument("--triton-root-cert", help="CA certificate of Triton's (implies --triton-ssl)")
    tls.add_argument("--triton-client-cert", help="the gateway's certificate, for Triton's mutual TLS")
    tls.add_argument("--triton-client-key", help="its private key")
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
