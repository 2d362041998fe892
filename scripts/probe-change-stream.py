#!/usr/bin/env python3
"""Checks that a MongoDB server's change stream delivers every insert of concurrent writers.

Starts the server binary given (default: the benchmarks' secantusd-rs) on a free port, opens
a change stream on an empty collection, has WRITERS clients insert PER documents each in
batches of 1,000 at the same time, and counts the inserts the stream delivers. Exits 1 when
any is missing, naming the first missing ones. Run it with the project's virtual environment
(pymongo comes with SecantusDB):

    .venv/bin/python scripts/probe-change-stream.py [BINARY] [--writers 4] [--per 50000]

secantusd-rs 0.5.3-beta.196 skips whole batches with 4 writers (about a fifth of the events);
secantusd-py 0.7.0b3 delivers all of them, as MongoDB guarantees.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pymongo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, ".ordo/tools/bin/secantusd-rs"))
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--per", type=int, default=50000)
    args = ap.parse_args()
    port = free_port()
    data = tempfile.mkdtemp(prefix="probe-change-stream-")
    server = subprocess.Popen(
        [args.binary, "--host", "127.0.0.1", "--port", str(port), "--storage-path", data],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"{args.binary} did not listen on port {port}")
                time.sleep(0.1)
        uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        events = pymongo.MongoClient(uri).probe.events
        stream = events.watch(batch_size=1000, max_await_time_ms=500)

        def write(writer):
            coll = pymongo.MongoClient(uri).probe.events
            for start in range(0, args.per, 1000):
                coll.insert_many(
                    [{"w": writer, "i": i} for i in range(start, min(start + 1000, args.per))]
                )

        writers = [threading.Thread(target=write, args=(w,)) for w in range(args.writers)]
        for w in writers:
            w.start()
        total = args.writers * args.per
        seen = set()
        last = time.time()
        # Done when all arrived, or when nothing arrived for 10 s after the writers finished.
        while len(seen) < total and (any(w.is_alive() for w in writers) or time.time() - last < 10):
            change = stream.try_next()
            if change is not None and change["operationType"] == "insert":
                doc = change["fullDocument"]
                seen.add((doc["w"], doc["i"]))
                last = time.time()
        for w in writers:
            w.join()
        stored = events.count_documents({})
        print(f"{args.writers} writers inserted {stored} documents; the change stream delivered {len(seen)}")
        if len(seen) < total:
            missing = sorted({(w, i) for w in range(args.writers) for i in range(args.per)} - seen)
            print(f"missing {len(missing)}, first: {missing[:5]}")
            sys.exit(1)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
