"""``medqc config check FILE`` and ``medqc config show [FILE]``."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check", "show"], help="check: validate FILE; show: print the effective config as JSON")
    p.add_argument("file", nargs="?", help="TOML config file (show: optional)")


def run(args) -> int:
    from medqc.config import ConfigError, config_to_dict, load_config
    from medqc.errors import UsageError

    if args.action == "check" and not args.file:
        raise UsageError("config check needs a FILE")
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(f"{args.file}: invalid: {e}")
        return 2
    if args.action == "check":
        print(f"{args.file}: ok")
    else:
        print(json.dumps(config_to_dict(cfg), indent=2))
    return 0
