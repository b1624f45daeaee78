"""`python -m benchmarks.gpu_check`: the command line is in cli.py."""

from benchmarks.gpu_check.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
