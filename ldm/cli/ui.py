"""`ldm ui [--model DIR] [--runs DIR] [--port N]`: a local web page to generate images, look inside the sampler,
follow training runs and run diagnostics (ldm.ui). It listens on 127.0.0.1 only unless --host says otherwise, and
prints the page's URL with a token made at each launch (http://127.0.0.1:7860/?token=...) on a line of its own:
the server answers only requests carrying that token and naming it in their Host header, so another web page
cannot drive it. A --model that is not a model folder stops it at start, as `ldm generate` does.

Needs the ui extra: pip install -c configs/constraints.txt -e ".[ui]"
"""
from __future__ import annotations

import os

from ldm.ranges import int_in


def add_arguments(p):
    p.add_argument("--model", default=None, help="the model folder the page generates with (it can be changed there)")
    p.add_argument("--runs", default=".", help="a folder of training runs (ldm train / ldm finetune output folders), "
                   "or one run")
    p.add_argument("--port", type=int_in("[1, 65535]"), default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on; 0.0.0.0 opens the page, which has no login, to the network")
    p.add_argument("--out", default="outputs", help="folder for the generated PNGs (as ldm generate --out)")


def run(args) -> int:
    try:
        import flask  # noqa: F401
    except ImportError as e:
        raise ValueError("the web UI needs Flask: pip install -c configs/constraints.txt -e \".[ui]\"") from e
    from ldm.folders import check_model_folder
    from ldm.ui.server import UISettings, serve

    if args.model and not os.path.isfile(args.model):  # a single-file checkpoint loads as `ldm generate` loads it
        check_model_folder(args.model)  # as `ldm generate` does: a missing folder or component stops here
    serve(UISettings(model=args.model, runs=args.runs, out=args.out), args.host, args.port)
    return 0
