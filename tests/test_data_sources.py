"""Each source kind, built from small data the test writes: counts, captions and tensor ranges."""
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from ldm.data import make_dataloader, open_dataset

R = 16  # tiny images keep the tests fast


def png(colour=(200, 30, 30), size=(24, 20), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def check(samples, count, resolution=R):
    assert len(samples) == count
    for s in samples:
        assert s["pixel_values"].shape == (3, resolution, resolution) and s["pixel_values"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0
        assert isinstance(s["caption"], str) and s["caption"] and isinstance(s["key"], str)
    return {s["key"]: s["caption"] for s in samples}


def test_shapes_spec_and_resolution():
    captions = check(list(open_dataset("shapes:12@32", shuffle=False)), 12, resolution=32)
    assert all(k.startswith("shapes-0-") for k in captions)
    check(list(open_dataset("shapes:5", resolution=R)), 5)


def test_folder_caption_precedence(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a.png", "sub/b.jpg", "c.webp", "d.bmp", "e.jpeg"):
        Image.new("RGB", (20, 24), (10, 200, 10)).save(write(root / name, b""))
    write(root / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n")
    write(root / "sub/metadata.csv", "file_name,text\nb.jpg,from csv\n")
    write(root / "c.txt", "from sidecar\n")
    write(root / "notes.md", "ignored")
    # d and e have no caption while metadata exists: skipped, unless a template is given
    dataset = open_dataset(str(root), resolution=R)
    assert check(list(dataset), 3) == {"a": "from metadata", "sub/b": "from csv", "c": "from sidecar"}
    assert dict(dataset.skips.counts) == {"missing_caption": 2}
    templated = check(list(open_dataset(str(root), resolution=R, caption="a photo of {name}")), 5)
    assert templated["d"] == "a photo of d" and templated["a"] == "from metadata"


def test_folder_filename_captions_and_instance_prompt(tmp_path):
    for name in ("red_circle-01.png", "blue-square_2.jpg"):
        Image.new("RGB", (30, 20), (0, 0, 255)).save(write(tmp_path / name, b""))
    assert sorted(check(list(open_dataset(str(tmp_path), resolution=R)), 2).values()) == ["blue square", "red circle"]
    instance = check(list(open_dataset(str(tmp_path), resolution=R, caption="a photo of sks dog")), 2)
    assert set(instance.values()) == {"a photo of sks dog"}


def test_folder_without_any_caption_names_the_missing_captions_before_reading_images(tmp_path):
    for name in ("0001.png", "0002.png", "0003.jpg"):  # numbered photos: no words in the names, no captions
        Image.new("RGB", (30, 20), (0, 0, 255)).save(write(tmp_path / "photos" / name, b""))
    with pytest.raises(ValueError) as refused:
        open_dataset(str(tmp_path / "photos"), resolution=R)
    message = str(refused.value)
    assert "none of the 3 images" in message and "has a caption" in message
    assert 'metadata.jsonl' in message and '"file_name": "0001.png"' in message and "0001.txt" in message
    assert "ldm finetune --instance-prompt" in message
    write(tmp_path / "photos" / "metadata.jsonl", json.dumps({"file_name": "other.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the 3 images .* metadata file\\(s\\) here name none of them"):
        open_dataset(str(tmp_path / "photos"), resolution=R)
    write(tmp_path / "photos" / "0002.txt", "a blue square")  # one caption: the others are skipped, counted
    dataset = open_dataset(str(tmp_path / "photos"), resolution=R)
    assert check(list(dataset), 1) == {"0002": "a blue square"} and dict(dataset.skips.counts) == {"missing_caption": 2}
    assert len(check(list(open_dataset(str(tmp_path / "photos"), resolution=R, caption="a photo of sks")), 3)) == 3


def test_webdataset_txt_json_glob_and_braces(tmp_path):
    for shard in range(3):
        members = []
        for i in range(4):
            key = f"s{shard}_{i}"
            members.append((f"{key}.jpg", png(fmt="JPEG")))
            if i % 2:
                members.append((f"{key}.json", json.dumps({"caption": f"json {key}"}).encode()))
            else:
                members.append((f"{key}.txt", f"txt {key}".encode()))
        write_tar(str(tmp_path / f"shards/{shard:05d}.tar"), members)
    for spec in (str(tmp_path / "shards/{00000..00002}.tar"), str(tmp_path / "shards/*.tar"), str(tmp_path / "shards")):
        captions = check(list(open_dataset(spec, resolution=R)), 12)
        assert captions["s1_0"] == "txt s1_0" and captions["s2_3"] == "json s2_3"
    check(list(open_dataset(str(tmp_path / "shards/00001.tar"), resolution=R)), 4)


def test_parquet_bytes_struct_and_path_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [png(), png()], "caption": ["one", "two"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [{"bytes": png(), "path": "x.png"}] * 3, "text": ["s1", "s2", "s3"]}),
                   tmp_path / "b.parquet", row_group_size=2)
    write(tmp_path / "imgs/p.png", png())
    pq.write_table(pa.table({"image_path": ["imgs/p.png"], "text": ["by path"]}), tmp_path / "c.parquet")
    captions = check(list(open_dataset(str(tmp_path), resolution=R, shuffle=False)), 6)
    assert sorted(captions.values()) == ["by path", "one", "s1", "s2", "s3", "two"]
    check(list(open_dataset(str(tmp_path / "b.parquet"), resolution=R)), 3)


def test_coco_uses_every_caption_across_epochs(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)]
    annotations = [{"image_id": i, "id": 10 * i + j, "caption": f"image {i} caption {j}"} for i in range(3) for j in range(5)]
    write(tmp_path / "annotations/captions_val2017.json", json.dumps({"images": images, "annotations": annotations}))
    for image in images:
        write(tmp_path / "val2017" / image["file_name"], png(fmt="JPEG"))
    dataset = open_dataset(str(tmp_path / "annotations/captions_val2017.json"), resolution=R)
    seen = set()
    for epoch in range(25):
        dataset.set_epoch(epoch)
        seen |= set(check(list(dataset), 3).values())
    assert seen == {a["caption"] for a in annotations}


def test_hf_save_to_disk(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [Image.new("RGB", (20, 20), (9, 9, 200)) for _ in range(3)], "text": ["x", "y", "z"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    assert sorted(check(list(open_dataset(str(tmp_path / "saved"), resolution=R)), 3).values()) == ["x", "y", "z"]


def test_loader_collates_batches(tmp_path):
    batches = list(make_dataloader("shapes:10", batch_size=4, resolution=R))
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, R, R), (4, 3, R, R), (2, 3, R, R)]
    assert sum(len(b["caption"]) for b in batches) == 10 and len({k for b in batches for k in b["key"]}) == 10


def test_bad_specs_raise_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        open_dataset(str(tmp_path / "missing-{000..003}.tar"))
    with pytest.raises(ValueError, match="unknown data format"):
        open_dataset(write(str(tmp_path / "list.txt"), "hello"))
    with pytest.raises(ValueError, match="shapes:N"):
        open_dataset("shapes:many")
    with pytest.raises(ValueError, match="no images"):
        open_dataset(str(tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"], "text": ["t"]}), tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match="no image column"):
        open_dataset(str(tmp_path / "odd.parquet"))
