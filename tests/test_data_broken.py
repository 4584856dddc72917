"""Broken input is skipped, counted by reason and reported; no good sample is lost; nothing crashes."""
import io
import logging
import os
import tarfile

import pytest
from PIL import Image

from ldm.data import make_dataloader, open_dataset

R = 16
GOOD = 4  # good images written beside each broken one


def image_bytes(size=(24, 24), fmt="PNG", noise=False) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise(size, 60).convert("RGB") if noise else Image.new("RGB", size, (30, 120, 200))
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def folder_with(tmp_path, name: str, data: bytes, caption: bytes = b"a caption") -> str:
    """Returns a folder of GOOD good images with sidecar captions plus one file `name` holding `data`."""
    for i in range(GOOD):
        (tmp_path / f"good{i}.png").write_bytes(image_bytes())
        (tmp_path / f"good{i}.txt").write_bytes(b"good caption")
    (tmp_path / name).write_bytes(data)
    (tmp_path / (os.path.splitext(name)[0] + ".txt")).write_bytes(caption)
    return str(tmp_path)


def run(spec, **kwargs):
    dataset = open_dataset(spec, resolution=R, **kwargs)
    samples = list(dataset)
    return samples, dict(dataset.skips.counts)


def corrupt_png() -> bytes:
    data = bytearray(image_bytes((32, 32)))
    idat = data.index(b"IDAT") + 8
    data[idat : idat + 8] = b"\x00\xff" * 4  # scrambled compressed pixels
    return bytes(data)


@pytest.mark.parametrize("name, data, reason", [
    ("truncated.jpg", image_bytes((64, 64), "JPEG", noise=True)[:1500], "corrupt_image"),
    ("corrupt.png", corrupt_png(), "corrupt_image"),
    ("empty.png", b"", "empty_file"),
    ("notes.jpg", b"this is a text file, not a JPEG", "not_an_image"),
    ("tiny.png", image_bytes((4, 7)), "too_small"),
])
def test_bad_image_files(tmp_path, name, data, reason):
    samples, skips = run(folder_with(tmp_path, name, data))
    assert len(samples) == GOOD and skips == {reason: 1}
    assert all(s["caption"] == "good caption" for s in samples)


def test_pixel_limit(tmp_path):
    samples, skips = run(folder_with(tmp_path, "huge.png", image_bytes((64, 64))), max_pixels=40 * 40)
    assert len(samples) == GOOD and skips == {"too_large": 1}


def test_pil_decompression_bomb_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL raises above 2x: 48x48 = 2304 > 600, 24x24 warns
    samples, skips = run(folder_with(tmp_path, "bomb.png", image_bytes((48, 48))))
    assert len(samples) == GOOD and skips == {"too_large": 1}


@pytest.mark.parametrize("caption, reason", [(b"", "missing_caption"), (b"  \n", "missing_caption"),
                                             (b"\xff\xfe not utf-8", "bad_caption_encoding")])
def test_bad_sidecar_captions(tmp_path, caption, reason):
    samples, skips = run(folder_with(tmp_path, "x.png", image_bytes(), caption=caption))
    assert len(samples) == GOOD and skips == {reason: 1}


def write_shard(path, count: int, start: int = 0, extra: list | None = None) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            for name, data in ((f"{i:04d}.jpg", image_bytes((24, 24), "JPEG")), (f"{i:04d}.txt", f"c{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, data in extra or []:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_shard_cut_off_in_the_middle(tmp_path):
    write_shard(tmp_path / "00000.tar", 4, start=100)
    full = open(write_shard(tmp_path / "00001.tar", 6), "rb").read()
    with tarfile.open(tmp_path / "00001.tar") as tar:
        fourth = tar.getmember("0003.jpg").offset_data  # cut inside the 4th record's image
    (tmp_path / "00001.tar").write_bytes(full[: fourth + 100])
    samples, skips = run(str(tmp_path / "{00000..00001}.tar"))
    assert sorted(s["caption"] for s in samples) == ["c0", "c1", "c100", "c101", "c102", "c103", "c2"]
    assert skips == {"truncated_shard": 1}


def test_shard_that_cannot_be_opened(tmp_path):
    write_shard(tmp_path / "00000.tar", 4)
    (tmp_path / "00001.tar").write_bytes(b"not a tar archive" * 50)
    samples, skips = run(str(tmp_path))
    assert len(samples) == 4 and skips == {"unreadable_shard": 1}


def test_missing_and_bad_captions_in_shards(tmp_path):
    extra = [("nocap.jpg", image_bytes(fmt="JPEG")), ("badcap.jpg", image_bytes(fmt="JPEG")),
             ("badcap.txt", b"\xc3\x28"), ("emptycap.jpg", image_bytes(fmt="JPEG")), ("emptycap.txt", b"")]
    samples, skips = run(write_shard(tmp_path / "00000.tar", 5, extra=extra))
    assert len(samples) == 5 and skips == {"missing_caption": 2, "bad_caption_encoding": 1}


def test_unreadable_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [image_bytes()] * 3, "text": ["a", "b", ""]}), tmp_path / "good.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 garbage")
    samples, skips = run(str(tmp_path))
    assert len(samples) == 2 and skips == {"unreadable_shard": 1, "missing_caption": 1}


def test_everything_at_once_through_two_workers_is_reported(tmp_path, caplog):
    for name, data in [("a.jpg", b""), ("b.jpg", b"text"), ("c.png", image_bytes((3, 3))), ("d.png", corrupt_png())]:
        (tmp_path / name).write_bytes(data)
    for i in range(GOOD):
        (tmp_path / f"good{i}.png").write_bytes(image_bytes())
    loader = make_dataloader(str(tmp_path), batch_size=3, num_workers=2, resolution=R)
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        assert sum(len(b["key"]) for b in loader) == GOOD
    assert dict(loader.skips.counts) == {"empty_file": 1, "not_an_image": 1, "too_small": 1, "corrupt_image": 1}
    assert "skipped 4 samples" in loader.skips.report() and "skipped 4 samples" in caplog.text
    assert sum(len(b["key"]) for b in loader) == GOOD and loader.skips.total == 4  # counts are per epoch
