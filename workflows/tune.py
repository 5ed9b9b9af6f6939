"""Entry point for `ray job submit -- python workflows/tune.py ...`: `lowlight tune` inside the job."""

import sys

from lowlight.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
