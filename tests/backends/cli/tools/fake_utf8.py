"""A tool whose multi-byte UTF-8 output arrives one byte per write, with pauses between,
so every character is split across reads."""

from __future__ import annotations

import sys
import time

TEXT = "héllo wörld — 日本語 🙂 ok"

for byte in TEXT.encode("utf-8"):
    sys.stdout.buffer.write(bytes([byte]))
    sys.stdout.buffer.flush()
    time.sleep(0.002)
