#!/usr/bin/env python3
"""What writing into fresh memory costs on this machine, against rewriting memory already
written (issue 10's in-run decline): a file on /dev/shm grown by 64 KiB pwrites for
DURATION seconds (every write needs a new page), then its first GiB rewritten for 3 s
(pages already there). Prints and writes docs/bench/fresh-memory/results.json with the
bytes written in each second. Run it alone: anything else allocating memory changes it.

    python3 scripts/bench-fresh-memory.py        # DURATION=12
"""
import json
import os
import platform
import tempfile
import time
from pathlib import Path

DURATION = int(os.environ.get("DURATION", "12"))
BLOCK = b"\x5a" * (64 << 10)
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "fresh-memory"


def run(fd, seconds, offset_of):
    """Writes for `seconds`; the n-th write goes to `offset_of(n)`. Bytes per second."""
    per_second, n, start = [], 0, time.monotonic()
    second_end, this_second = start + 1, 0
    while True:
        now = time.monotonic()
        if now >= second_end:
            per_second.append(this_second)
            this_second, second_end = 0, second_end + 1
            if len(per_second) == seconds:
                return per_second, n
        os.pwrite(fd, BLOCK, offset_of(n))
        n += 1
        this_second += len(BLOCK)


def main():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        fd = os.open(os.path.join(d, "grow"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fresh, written = run(fd, DURATION, lambda n: n * len(BLOCK))
            gib_blocks = min(written, (1 << 30) // len(BLOCK))
            rewrite, _ = run(fd, 3, lambda n: (n % gib_blocks) * len(BLOCK))
        finally:
            os.close(fd)
    result = {
        "created_unix_s": int(time.time()),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "block_bytes": len(BLOCK),
        "fresh_bytes_per_second": fresh,
        "rewrite_bytes_per_second": rewrite,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print("fresh pages, MB/s per second:", [round(b / 1e6) for b in fresh])
    print("rewriting written pages, MB/s per second:", [round(b / 1e6) for b in rewrite])
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
