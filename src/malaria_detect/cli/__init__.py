"""The `malaria-detect` command: thin argument parsing around the package, one module per command
family (cells.py, fields.py, samples.py, training.py, serving.py), shared options in options.py. Each command
prints through its result's own formatting (counting.Summary.format, evaluate.format_report, ...)."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import cells, fields, samples, serving, training

DESCRIPTION = """\
malaria-detect: is a red blood cell in a Giemsa-stained thin-smear image parasitized or uninfected?
A research and screening aid, not a diagnosis.

Typical use:
  malaria-detect predict cells/ --csv results.csv      classify every image in a folder (no PyTorch needed)
  malaria-detect smear fields/ --json out.json         whole microscope fields: every red cell, parasitemia
  malaria-detect adapt --data my_cells/ --out lab.onnx calibrate to your lab with a few dozen labelled cells
  malaria-detect serve                                 web app and REST API at http://127.0.0.1:8000
  malaria-detect evaluate --data DIR                   honest figures on patients the model never saw
  malaria-detect train --data DIR --out runs/NAME      train your own model (needs the [train] extra)
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """-> (the parser, {command name: function(args) -> exit status}); commands listed by family."""
    ap = argparse.ArgumentParser(prog="malaria-detect", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for family in (cells, fields, samples, training, serving):
        commands.update(family.add_parsers(sub))
    for p in sub.choices.values():  # --debug after the command too (there it can only switch it on)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return ap, commands


def main(argv=None) -> int:
    ap, commands = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 2
    from ..errors import MalariaDetectError

    warnings.simplefilter("always", UserWarning)
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"WARNING: {msg}\n"
    try:
        return commands[a.command](a)
    except MalariaDetectError as e:  # the project's own errors: one line. Anything else is a bug: a traceback
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
