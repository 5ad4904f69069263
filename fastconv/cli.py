"""`python -m fastconv <command>` (also installed as the `fastconv` console script).

Commands:
  info    what was compiled (CPU / CUDA kernels, arch list, versions) and a quick check of
          every op against torch on each available device
  bench   benchmark fastconv against torch (cuDNN / ATen / oneDNN) on real layer shapes
  demo    train the tutorials' CNNs twice, with torch.nn layers and with fastconv's
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module providing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "info": ("fastconv.info", "show the build and check every op against torch"),
    "bench": ("fastconv.benchmark", "benchmark fastconv against torch on real layer shapes"),
    "demo": ("fastconv.demo", "train the tutorials' CNNs with torch.nn and with fastconv layers"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
