"""Entry point for `ray job submit -- python workflows/run.py`: the main job on the embedded default."""

import sys

from lowlight.cli import app

if __name__ == "__main__":
    app(["run", *sys.argv[1:]])
