"""The cost of the session MAC on the data path: HMAC-SHA256 against keyed BLAKE2b.

    python bench/bench_mac.py [--mib 32]

Times both MACs over frames of the sizes the protocol sends (a ping, a 64 KiB output read, a
256 KiB file chunk), then what gproc.session's seal and open cost to move ``--mib`` MiB in
256 KiB chunks over one link: a hop pays one open for what it receives and one seal per
child it forwards to.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time

from gproc.protocol import CHUNK, LENGTH, Data, encode
from gproc.session import Session


def per_call(fn, data: bytes, budget: float = 0.5) -> float:  # noqa: ANN001 - a callable
    """Seconds per call of ``fn(data)``, over about ``budget`` seconds."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for _ in range(50):
            fn(data)
        n += 50
    return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=32)
    args = ap.parse_args()
    key = os.urandom(32)
    keyed = hmac.new(key, digestmod="sha256")

    def hmac_sha256(data: bytes) -> bytes:
        mac = keyed.copy()
        mac.update(data)
        return mac.digest()

    def blake2b(data: bytes) -> bytes:
        return hashlib.blake2b(data, key=key, digest_size=32).digest()

    print(f"{'frame':>10}  {'HMAC-SHA256':>22}  {'BLAKE2b':>22}")
    for size in (16, 64 << 10, CHUNK):
        data = os.urandom(size)
        row = [per_call(f, data) for f in (hmac_sha256, blake2b)]
        cells = [f"{t * 1e6:8.1f} us {size / t / 1e9:6.2f} GB/s" for t in row]
        print(f"{size:>10}  {cells[0]:>22}  {cells[1]:>22}")
    sender, receiver = Session(key, key), Session(key, key)
    body = encode(Data("0123456789ab", 1, os.urandom(CHUNK)))
    chunks = args.mib * (1 << 20) // CHUNK
    t = time.perf_counter()
    for _ in range(chunks):
        frame = sender.seal(body)
        receiver.open(frame[: LENGTH.size], frame[LENGTH.size :])
    took = time.perf_counter() - t
    print(
        f"seal + open of {args.mib} MiB in {CHUNK >> 10} KiB frames: {took * 1e3:.1f} ms "
        f"({args.mib / took:.0f} MiB/s per link and direction)"
    )


if __name__ == "__main__":
    main()
