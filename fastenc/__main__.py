"""`python -m fastenc info | finetune ...` (also the `fastenc` console script)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastenc", description="fastenc command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, available backends, the extension's CUDA archs, the GPU")
    # finetune's options are its own CLI's (fastenc.finetune.cli): everything after the word goes there.
    commands.add_parser("finetune", add_help=False, help="fine-tune an encoder (python -m fastenc finetune --help)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "finetune":
        from fastenc.finetune.cli import main as finetune

        return finetune(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import fastenc

        fastenc.info()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
