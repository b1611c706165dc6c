"""The ``medqc`` command. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; those modules import heavy dependencies (torch, onnxruntime, pynetdicom) inside
``run`` only, so ``medqc --help`` is instant and works without the training extras.

A command that needs an optional dependency group of medqc (``train``: PyTorch, SciPy, numba, ONNX, tqdm,
matplotlib) says which one when it is missing (exit 2), instead of failing with an import error: ``REQUIRES``
lists what each command needs before it starts; any other module of an extra found missing on the way is
named the same way."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys

from medqc import __version__
from medqc.errors import MedqcError, UsageError

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("medqc.synth.cli", "write a physics-based synthetic CT study (DICOM + truth.json)"),
    "train": ("medqc.models.train", "train the QC network on synthetic CT"),
    "export": ("medqc.export.cli", "export models to ONNX / TensorRT bundles with parity gates"),
    "analyze": ("medqc.agent.analyze", "run the QC pipeline offline on DICOM files or folders"),
    "calibrate": ("medqc.agent.calibrate", "learn each scanner's normal noise and ring level from a site export"),
    "agent": ("medqc.agent.daemon", "run the QC agent: DICOM receiver, drop folder, HTTP API"),
    "replay": ("medqc.tools.replay.cli", "replay recorded studies over DICOM at scanner speed"),
    "bench": ("medqc.tools.bench.cli", "measure ingest, inference and end-to-end throughput side by side"),
    "config": ("medqc.config_cli", "check or print the agent configuration"),
}

# command (or "command subcommand") → modules it cannot start without (all from the 'train' extra); checked
# before it runs
REQUIRES: dict[str, tuple[str, ...]] = {
    "synth": ("scipy", "numba", "tqdm"),
    "train": ("torch", "scipy", "numba", "tqdm"),
    "export onnx": ("torch", "onnx"),
}


# a command whose exit status 1 means something else (medqc analyze: a series failed) reports a failure to
# complete (an internal error, a failure with a message) with this status instead
FAILURE_STATUS: dict[str, int] = {"analyze": 4}


def extra_of(module: str) -> str | None:
    """The optional-dependency group of medqc (``train``, ``gpu``, ``test``) that installs ``module``."""
    try:
        from importlib.metadata import PackageNotFoundError, requires

        reqs = requires("medqc") or []
    except (ImportError, PackageNotFoundError):
        return None
    want = module.split(".")[0].lower().replace("_", "-")
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9._-]+).*;.*extra\s*==\s*['\"]([^'\"]+)['\"]", r)
        if m and m.group(1).lower().replace("_", "-") == want:
            return m.group(2)
    return None


def missing_extra(command: str, modules: list[str]) -> str:
    """The message for a command whose optional dependencies are not installed."""
    extras = sorted({extra_of(m) or "train" for m in modules})
    pip = " ".join(f"'medqc[{e}]'" for e in extras)
    return (f"'medqc {command}' needs {', '.join(modules)}, not installed here: install the "
            f"{' and '.join(repr(e) for e in extras)} extra (pip install {pip}; in a source checkout: make install-dev)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep its message format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medqc", description="CT quality control beside the scanner.")
    parser.add_argument("--version", action="version", version=f"medqc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            p.set_defaults(_missing=f"'medqc {name}' is not available in this install: {e}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MEDQC_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"medqc: {args._missing}", file=sys.stderr)
        return 2
    name = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    absent = [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    if absent:
        print(f"medqc {args.command}: error: {missing_extra(name, absent)}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ModuleNotFoundError as e:
        if not e.name or extra_of(e.name) is None or os.environ.get("MEDQC_DEBUG"):
            return _internal(args.command, e)
        print(f"medqc {args.command}: error: {missing_extra(args.command, [e.name.split('.')[0]])}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"medqc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MedqcError as e:
        print(f"medqc {args.command}: {e}", file=sys.stderr)
        return FAILURE_STATUS.get(args.command, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return _internal(args.command, e)


def _internal(command: str, e: Exception) -> int:
    if os.environ.get("MEDQC_DEBUG"):
        raise e
    print(f"medqc {command}: internal error: {type(e).__name__}: {e} (set MEDQC_DEBUG=1 for the traceback)", file=sys.stderr)
    return FAILURE_STATUS.get(command, 1)


if __name__ == "__main__":
    raise SystemExit(main())
