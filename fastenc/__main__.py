"""`python -m fastenc info` (also the `fastenc` console script)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastenc", description="fastenc command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, available backends, the extension's CUDA archs, the GPU")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fastenc

        fastenc.info()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
