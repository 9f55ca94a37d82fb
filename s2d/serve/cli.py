"""``s2d serve``: load a family, build the server, run it under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys


def add_serve(sub: argparse._SubParsersAction) -> None:
    from s2d.cli import add_draft_args, int_in

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (several targets, one draft)")
    p.add_argument("--target", action="append", default=None,
                   help="[NAME=]checkpoint directory or hub id; repeat for several (default: the embedded family); "
                        "NAME is the API's model id")
    add_draft_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65536), default=8000)
    p.add_argument("--api-key", default=os.environ.get("S2D_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default $S2D_API_KEY; none)")
    p.add_argument("--max-slots", type=int_in(1, 1025), default=4,
                   help="sequences decoded at once per target, each with its own KV cache (default 4)")
    p.add_argument("--max-waiting", type=int_in(1, 1 << 20), default=64,
                   help="requests queued beyond those; further ones get 503 (default 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from s2d.cli import default_method, draft_options
    from s2d.drafting import check_method, needs_draft_model
    from s2d.loading import embedded_family, load_family, parse_targets
    from s2d.model.loading import check_device
    from s2d.serve.app import Server, ServerConfig, create_app

    if not args.target:
        family, embedded_draft = embedded_family()
        args.target = [f"{name}={path}" for name, path in family.items()]
        args.draft = args.draft or str(embedded_draft)
        print("s2d serve: no --target: serving the embedded default, zoo-l with its sorted draft", file=sys.stderr)
    if args.method:
        check_method(args.method)
        if needs_draft_model(args.method) and not args.draft:
            raise SystemExit(f"s2d serve: --method {args.method} needs --draft DIR")
    check_device(args.device, "--device")
    targets = parse_targets(args.target)
    tokenizer, models, draft = load_family(targets, args.draft, args.dtype, args.device)
    if len(targets) > 1:  # one vocabulary (load_family checked), but each target's own chat template and specials
        from s2d.model.loading import load_tokenizer

        tokenizer = {name: load_tokenizer(path) for name, path in targets.items()}
    method = default_method(args.method, draft)

    def options(target: str, m: str):
        return draft_options(args, m, args.draft, target, draft, models[target])

    for name in targets:  # refuse bad drafting flags or a bad calibration now, not at the first request
        options(name, method)
    server = Server(tokenizer, models, draft, ServerConfig(method, args.api_key, args.max_slots, args.max_waiting),
                    options)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"s2d serve: {', '.join(targets)} ({method}) at {where}; Ctrl-C stops", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=10)
    return 0
