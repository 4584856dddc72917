"""Streaming throughput: images/s through decode and augmentation (ImageTextDataset + make_dataloader, random
crops) from webdataset shards served over HTTP, against the same shards read from disk, with 1 and 2 workers.

    python benchmarks/bench_streaming.py                          # 256 JPEGs of 512 px in 8 shards -> 256 px crops
    python benchmarks/bench_streaming.py --num-images 16 --image-size 64 --resolution 32 --repeats 1   # quick

The shards are scikit-image's sample photographs (ldm.data.photos, in its wheel) packed by ldm prepare-data's
pack_shards; the server is `python -m http.server` in its own process on 127.0.0.1 (one new connection per
shard, as with a plain object store). Each figure is the best of --repeats epochs after one warm-up epoch;
the last lines are the ratios HTTP/disk (1.0: streaming costs nothing over reading the local files).
"""
from __future__ import annotations

import argparse
import os
import socket
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


def epoch_rate(spec: str, resolution: int, workers: int, batch_size: int, repeats: int) -> tuple[float, int]:
    """Returns (the best images/s over `repeats` epochs after a warm-up epoch, images per epoch)."""
    from ldm.data import make_dataloader, open_dataset

    dataset = open_dataset(spec, resolution=resolution, center_crop=False, random_flip=True, seed=0)
    loader = make_dataloader(dataset, batch_size=batch_size, num_workers=workers)
    rates, count = [], 0
    for epoch in range(repeats + 1):
        start = time.perf_counter()
        count = sum(len(batch["key"]) for batch in loader)
        if loader.skips.total:
            raise RuntimeError(f"{spec}: {loader.skips.report()}")
        if epoch:  # epoch 0 warms the page cache and the server
            rates.append(count / (time.perf_counter() - start))
    return max(rates), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512, help="side of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=256, help="side of the random crops")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
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
            ratios = {}
            for workers in (1, 2):
                disk, n = epoch_rate(os.path.join(tmp, pattern), args.resolution, workers, args.batch_size,
                                     args.repeats)
                http, m = epoch_rate(f"{url}/{pattern}", args.resolution, workers, args.batch_size, args.repeats)
                assert n == m == args.num_images, (n, m)
                print(f"{workers} worker(s): disk {disk:.1f} images/s, HTTP {http:.1f} images/s")
                ratios[workers] = http / disk
        finally:
            server.kill()
            server.wait()
        for workers, ratio in ratios.items():
            print(f"ratio_http_over_disk_{workers}_workers: {ratio:.2f}")


if __name__ == "__main__":
    main()
