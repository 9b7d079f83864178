"""The ``cupydcn`` command: ``cupydcn check`` and ``cupydcn bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the bench parses its own arguments, in their order
        from cupydcn import _bench

        return _bench.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="cupydcn",
        description="Deformable convolution and RoI pooling on CuPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check", help="report the GPU and CuPy found, run every op and compare with the reference")
    commands.add_parser("bench", help="time every op against torchvision and cuDNN (GPU); "
                                      "cupydcn bench --help for its options")
    parser.parse_args(argv)
    from cupydcn import _check

    return _check.main([])


if __name__ == "__main__":
    sys.exit(main())
