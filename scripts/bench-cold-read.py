#!/usr/bin/env python3
"""What reading a file that is no longer in the page cache costs on this machine (the
log's cold path: a consumer further behind than `--page-cache-keep-bytes`), three ways:

- `direct`: O_DIRECT into one reused buffer: the disk's own rate, no page cache;
- `buffered`: plain reads, every page brought into the page cache in fresh memory and
  left there (what the cold path did before it dropped behind its readers);
- `buffered-drop-behind`: plain reads, dropping (POSIX_FADV_DONTNEED) what the reader
  has passed before the next read, so the kernel refills pages it has just freed (what
  the log's cold path does now, `PartitionLog::read_resident`).

A SIZE_MIB file (default 2048) is written on disk (in $TMPDIR, which must not be tmpfs),
synced and dropped from the page cache; each cell starts QUIESCE seconds (default 5) after
the previous one dropped it, so that memory freed before it has gone back to the host
(these VMs report freed memory to their hypervisor, and a page touched again then costs
a fault there). Cells interleaved, REPS repetitions (default 3). Prints and writes
docs/bench/cold-read/results.json. Run it alone.

    python3 scripts/bench-cold-read.py
"""
import json
import mmap
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SIZE = int(os.environ.get("SIZE_MIB", "2048")) << 20
REPS = int(os.environ.get("REPS", "3"))
QUIESCE = float(os.environ.get("QUIESCE", "5"))
CHUNK = 4 << 20  # as a fetch's 4 MiB partition limit
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "cold-read"
MODES = ["direct", "buffered", "buffered-drop-behind"]


def drop(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_all(path, mode, buf):
    flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags)
    try:
        start, off = time.monotonic(), 0
        while off < SIZE:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                raise RuntimeError(f"short read at {off}")
            if mode == "buffered-drop-behind" and off >= CHUNK:
                # What the reader has passed: everything before the chunk just read.
                os.posix_fadvise(fd, 0, off, os.POSIX_FADV_DONTNEED)
            off += n
        return SIZE / (time.monotonic() - start)
    finally:
        drop(fd)
        os.close(fd)


def main():
    with tempfile.TemporaryDirectory() as d:
        fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        if fs == "tmpfs":
            raise SystemExit(f"{d} is on tmpfs: set TMPDIR to a disk")
        path = os.path.join(d, "cold")
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(CHUNK))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        for off in range(0, SIZE, CHUNK):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        drop(fd)
        os.close(fd)
        rates = {m: [] for m in MODES}
        for rep in range(REPS):
            for m in MODES:
                time.sleep(QUIESCE)
                rates[m].append(read_all(path, m, buf))
                print(f"rep {rep + 1} {m}: {rates[m][-1] / 1e9:.2f} GB/s", flush=True)
    result = {
        "created_unix_s": int(time.time()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "file_bytes": SIZE,
        "read_bytes": CHUNK,
        "quiesce_s": QUIESCE,
        "bytes_per_second": rates,
        "median_bytes_per_second": {m: statistics.median(r) for m, r in rates.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    for m in MODES:
        print(f"{m}: median {result['median_bytes_per_second'][m] / 1e9:.2f} GB/s")
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
