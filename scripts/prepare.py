#!/usr/bin/env python
"""Thin wrapper: the same as `unipers prepare ...`.

    python scripts/prepare.py photos/bo --name bo --class-word dog --out data/bo
"""

import sys

from unipers.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
