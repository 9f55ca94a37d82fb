"""``s2d serve``: load a family, build the server, run it under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys

from s2d.args import DTYPES, DraftFlags, add_draft_args, int_in
from s2d.serve import DEFAULT_PREFILL_CHUNK


def add_serve(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--prefill-chunk", type=int_in(1, 1 << 20), default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens prefilled per scheduler step: a long prompt is prefilled in chunks of this "
                        "many, and the other sequences' decode steps run between them (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from s2d.resolve import choose, load
    from s2d.serve.app import Server, ServerConfig, create_app

    # Requests pick their own method: the draft is loaded whatever --method is.
    choice = choose("s2d serve", args.target, args.draft, args.method, args.device, every_method=True)
    if choice.embedded:
        print("s2d serve: no --target: serving the embedded default, zoo-l with its sorted draft", file=sys.stderr)
    family = load(choice, args.dtype)
    targets, tokenizer = choice.targets, family.tokenizer
    if len(targets) > 1:  # one vocabulary (load checked), but each target's own chat template and specials
        from s2d.model.loading import load_tokenizer

        tokenizer = {name: load_tokenizer(path) for name, path in targets.items()}
    flags = DraftFlags.of(args)

    def options(target: str, method: str):
        return family.options(target, method, flags)

    for name in targets:  # refuse bad drafting flags or a bad calibration now, not at the first request
        options(name, family.method)
    server = Server(tokenizer, family.models, family.draft,
                    ServerConfig(family.method, args.api_key, args.max_slots, args.max_waiting,
                                 prefill_chunk=args.prefill_chunk), options)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"s2d serve: {', '.join(targets)} ({family.method}) at {where}; Ctrl-C stops", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=10)
    return 0
