"""A stand-in for Simon Willison's `llm` CLI: `llm -m MODEL [-s SYSTEM] [PROMPT]`.

Like `llm`, it takes the prompt as its last argument or, when there is none, reads it
from stdin, and prints the answer followed by a newline. The "model" is deterministic: it
echoes the prompt back word by word (flushing each word), so tests can assert on content
and on streaming. Extra flags exist only for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", default="echo")
    parser.add_argument("-s", "--system", default=None)
    parser.add_argument("--max-tokens", default=None)
    parser.add_argument("--temperature", default=None)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between words")
    parser.add_argument("--argv-file", default=None, help="write sys.argv[1:] here as JSON")
    parser.add_argument("--pid-file", default=None, help="write our pid here")
    parser.add_argument("--then-hang", action="store_true", help="keep running after the answer")
    parser.add_argument("prompt", nargs="?")
    args = parser.parse_args()

    if args.argv_file:
        with open(args.argv_file, "w") as f:
            json.dump(sys.argv[1:], f)
    if args.pid_file:
        with open(args.pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(args.pid_file + ".tmp", args.pid_file)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()

    for word in re.findall(r"\S+\s*|\s+", prompt):
        sys.stdout.write(word)
        sys.stdout.flush()
        if args.delay:
            time.sleep(args.delay)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.then_hang:
        time.sleep(3600)


if __name__ == "__main__":
    main()
