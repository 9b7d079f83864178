"""The ``cupydcn`` command: ``cupydcn check``, ``cupydcn bench`` and ``cupydcn --version``."""

from __future__ import annotations

import argparse
import sys

_CHECK = ("Report the GPU and CuPy found, run every op forward and backward in every dtype "
          "(float32, float64, float16, bfloat16) on the GPU, or with no GPU on the same kernel "
          "source compiled for the CPU, and compare each result with the float64 NumPy "
          "reference. The first run compiles the kernels (about 15 s); later runs reuse them. "
          "Exit status 0 when every comparison passes, 1 otherwise.")


def _parser():
    import cupydcn

    parser = argparse.ArgumentParser(
        prog="cupydcn",
        description="Deformable convolution and RoI pooling on CuPy. "
                    "Start with `cupydcn check`.")
    parser.add_argument("--version", action="version", version=f"cupydcn {cupydcn.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser(
        "check", description=_CHECK,
        help="report the GPU and CuPy found, run every op and compare with the reference")
    commands.add_parser("bench", help="time every op and implementation against torchvision "
                                      "and cuDNN (GPU); cupydcn bench --help for its options")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the bench parses its own arguments, in their order
        from cupydcn._bench import cli

        return cli.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: say which there are
        parser.print_help(sys.stderr)
        print("\ncupydcn: a command is needed; `cupydcn check` checks this machine",
              file=sys.stderr)
        return 2
    from cupydcn import _check

    return _check.main([])


if __name__ == "__main__":
    sys.exit(main())
