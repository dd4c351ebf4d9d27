"""A tool that spawns a grandchild and then never finishes (or finishes while the
grandchild lives on, holding our stdout). Writes "<pid> <grandchild pid>" to PID_FILE
before printing "ready", so tests can check that both die."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

GRANDCHILD = "import signal, time\n{ignore}time.sleep(3600)\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pid_file")
    parser.add_argument("--ignore-term", action="store_true", help="both processes ignore SIGTERM")
    parser.add_argument("--exit", action="store_true", help="exit 0 after 'ready', leaving the grandchild")
    args = parser.parse_args()

    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if args.ignore_term else ""
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The grandchild inherits stdout and stderr, like a helper process a real tool starts.
    grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD.format(ignore=ignore)])
    with open(args.pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(args.pid_file + ".tmp", args.pid_file)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if args.exit:
        time.sleep(0.2)  # so the reader is already waiting on stdout when we go
        os._exit(0)
    time.sleep(3600)


if __name__ == "__main__":
    main()
