"""``python -m cupydcn._bench ARGS`` (the same as ``cupydcn bench ARGS``)."""

import sys

from cupydcn._bench.cli import main

sys.exit(main())
