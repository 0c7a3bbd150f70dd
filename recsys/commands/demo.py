"""`recsys demo`: the whole product end to end on built-in synthetic data (what `make demo` runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run synth -> prepare -> train -> evaluate -> publish -> serve -> query -> retrain + hot reload",
        description=(
            "End-to-end demo on built-in synthetic logs: generate logs, prepare the older part, train a two-tower "
            "model, evaluate it against baselines, publish a bundle, start the gRPC server, query it through the "
            "Python client (a known user, a new user by history, similar items, an error case), then retrain on "
            "the full logs and show the running server hot-reloading the new version. A few minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--workdir", default="demo", help="where data, runs, models and reports go (default: demo)")
    p.add_argument("--events", type=int, default=400_000, help="synthetic events (default: 400000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (default: 10000)")
    p.add_argument("--items", type=int, default=3_000, help="synthetic items (default: 3000)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo config's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--port", type=int, default=50051, help="server port for --serve (default: 50051; 0 = free)")
    p.add_argument("--serve", action="store_true", help="leave the server running afterwards (Ctrl-C to stop)")
    p.add_argument("--no-retrain", action="store_true", help="skip the retrain + hot-reload step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recsys.demo import DemoOptions, run_demo

    run_demo(DemoOptions(
        workdir=args.workdir, events=args.events, users=args.users, items=args.items, epochs=args.epochs,
        device=args.device, port=args.port, serve=args.serve, retrain=not args.no_retrain,
    ))
    return 0
