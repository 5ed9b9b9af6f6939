"""Entry point for `ray job submit -- python workflows/train.py --config FILE [--set k=v ...]`."""

import sys

from lowlight.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
