"""The ``cupydcn`` command: ``cupydcn check`` and ``cupydcn bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="cupydcn",
        description="Deformable convolution and RoI pooling on CuPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check", help="report the GPU and CuPy found, run every op and compare with the reference")
    bench = commands.add_parser("bench", help="time every op against torchvision and cuDNN (GPU)",
                                add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        from cupydcn import _check

        return _check.main(rest)
    from cupydcn import _bench

    return _bench.main(args.rest + rest)


if __name__ == "__main__":
    sys.exit(main())
