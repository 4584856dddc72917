"""Streaming throughput: images/s through decode and augmentation (ImageTextDataset + make_dataloader, random
crops) from webdataset shards served over HTTP, against the same shards read from disk, with 1 and 2 workers.

    python benchmarks/bench_streaming.py                          # 256 JPEGs of 512 px in 8 shards -> 256 px crops
    python benchmarks/bench_streaming.py --num-images 16 --image-size 64 --resolution 32 --repeats 1   # quick

The shards are scikit-image's sample photographs (ldm.data.photos, in its wheel) packed by ldm prepare-data's
pack_shards; the server is `python -m http.server` in its own process on 127.0.0.1 (one new connection per
shard, as with a plain object store). Each figure is the median of --repeats epochs, disk and HTTP taken in
turn after one warm-up epoch each. A first line times the transport alone (tar records read, nothing decoded).
The last lines are the ratios HTTP/disk (1.0: streaming costs nothing over reading the local files).
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str) -> tuple[subprocess.Popen, str]:
    """Returns (the http.server process serving `folder`, its base URL) once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/manifest.json", timeout=1).read()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"python -m http.server did not answer on port {port}")


def loader_of(spec: str, resolution: int, workers: int, batch_size: int):
    from ldm.data import make_dataloader, open_dataset

    dataset = open_dataset(spec, resolution=resolution, center_crop=False, random_flip=True, seed=0)
    return make_dataloader(dataset, batch_size=batch_size, num_workers=workers)


def epoch_rate(loader) -> tuple[float, int]:
    """Returns (images/s, images) of one epoch of `loader`; raises if any sample was skipped."""
    start = time.perf_counter()
    count = sum(len(batch["key"]) for batch in loader)
    if loader.skips.total:
        raise RuntimeError(loader.skips.report())
    return count / (time.perf_counter() - start), count


def transport_rate(spec: str) -> float:
    """Returns MB/s of reading every record's bytes (tar parsing only, no decode) of the shards of `spec`."""
    from ldm.data.open import open_source

    source, _ = open_source(spec)
    start, size = time.perf_counter(), 0
    for unit in source.units():
        size += sum(len(r["image_bytes"]) + len(r["caption"] or b"") for r in source.read(unit, random.Random(0)))
    return size / 1e6 / (time.perf_counter() - start)


def alternating_rates(specs: dict, resolution: int, workers: int, batch_size: int, repeats: int) -> dict:
    """Returns {name: median images/s} over `repeats` epochs of each spec, taken in turn (disk, HTTP, disk, ...)
    after one warm-up epoch each, so that a change of machine load hits both alike."""
    loaders = {name: loader_of(spec, resolution, workers, batch_size) for name, spec in specs.items()}
    rates = {name: [] for name in specs}
    for repeat in range(repeats + 1):
        for name, loader in loaders.items():
            rate, _ = epoch_rate(loader)
            if repeat:  # the first pass warms the page cache and the server
                rates[name].append(rate)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512, help="side of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=256, help="side of the random crops")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ldm.data.pack import pack_shards

    with tempfile.TemporaryDirectory() as tmp:
        pack_shards(f"photos:{args.num_images}@{args.image_size}", tmp, shard_size=-(-args.num_images // args.shards),
                    quality=90)
        pattern = "{%05d..%05d}.tar" % (0, args.shards - 1)
        server, url = start_server(tmp)
        try:
            print(f"{args.num_images} JPEGs {args.image_size} px in {args.shards} shards -> {args.resolution} px "
                  f"random crops, batch {args.batch_size}, {os.cpu_count()} CPU cores, load average "
                  f"{os.getloadavg()[0]:.1f}")
            specs = {"disk": os.path.join(tmp, pattern), "HTTP": f"{url}/{pattern}"}
            transport = {name: [] for name in specs}
            for _ in range(args.repeats):
                for name, spec in specs.items():
                    transport[name].append(transport_rate(spec))
            transport = {name: statistics.median(values) for name, values in transport.items()}
            print(f"tar records only (no decode), one process: disk {transport['disk']:.0f} MB/s, "
                  f"HTTP {transport['HTTP']:.0f} MB/s")
            ratios = {"transport": transport["HTTP"] / transport["disk"]}
            for workers in (1, 2):
                rates = alternating_rates(specs, args.resolution, workers, args.batch_size, args.repeats)
                print(f"{workers} worker(s): disk {rates['disk']:.1f} images/s, HTTP {rates['HTTP']:.1f} images/s")
                ratios[f"{workers}_workers"] = rates["HTTP"] / rates["disk"]
        finally:
            server.kill()
            server.wait()
        for name, ratio in ratios.items():
            print(f"ratio_http_over_disk_{name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
