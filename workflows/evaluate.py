"""Entry point for `ray job submit -- python workflows/evaluate.py ...`: `lowlight evaluate` inside the job."""

import sys

from lowlight.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
