#!/usr/bin/env python
"""Thin wrapper: the same as `unipers train ...`.

    python scripts/train.py configs/personalize.yaml data.concepts=[data/bo] run_dir=runs/bo
"""

import sys

from unipers.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
