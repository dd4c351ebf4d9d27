"""A tool that fails: prints some output, complains on stderr, and exits non-zero."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stdout", default="")
    parser.add_argument("--flood-stderr", type=int, default=0, help="bytes of noise on stderr first")
    parser.add_argument("--code", type=int, default=3)
    parser.add_argument("--signal", default=None, help="die by this signal instead of exiting")
    args = parser.parse_args()

    sys.stdout.write(args.stdout)
    sys.stdout.flush()
    if args.flood_stderr:
        line = "noise " * 15 + "\n"
        sys.stderr.write(line * (args.flood_stderr // len(line) + 1))
    for i in range(1, 8):
        sys.stderr.write(f"warning: step {i} went sideways\n")
    sys.stderr.write("error: quota exhausted for this account\n")
    sys.stderr.flush()
    if args.signal:
        os.kill(os.getpid(), getattr(signal, args.signal))
    sys.exit(args.code)


if __name__ == "__main__":
    main()
