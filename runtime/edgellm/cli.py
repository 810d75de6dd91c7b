"""The `edgellm` command. Each area registers its own subcommands:

    engine/cli.py   build, demo-engine, run
    serving/cli.py  serve, generate, info (and `edgellmd`)
    ota/cli.py      keygen, sign, verify, push, engines, rollback
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgellm import __version__
from edgellm.errors import EdgeLLMError

COMMAND_MODULES = ("edgellm.engine.cli", "edgellm.serving.cli", "edgellm.ota.cli", "edgellm.doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="LLM runtime for NVIDIA edge appliances")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that area is not part of this build yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EdgeLLMError as e:
        print(f"edgellm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def daemon_main() -> int:
    """`edgellmd ...` is `edgellm serve ...`."""
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
