"""The command that runs the web app and REST API: serve."""

from __future__ import annotations

from . import options as O


def add_parsers(sub) -> dict:
    p = sub.add_parser("serve", help="web app + REST API (default http://127.0.0.1:8000)")
    O.add_model(p, "ONNX model for single cells and, when given, for /smear too")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="comma-separated Host headers to answer (e.g. localhost,127.0.0.1), against DNS "
                        "rebinding; default: MALARIA_DETECT_ALLOWED_HOSTS, else localhost,127.0.0.1,[::1] when "
                        "bound to a loopback address and any host otherwise")
    return {"serve": cmd_serve}


def cmd_serve(a):
    from ..serve.app import run

    run(model=a.model, host=a.host, port=a.port, allowed_hosts=a.allowed_hosts)
    return 0
