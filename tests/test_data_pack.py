"""`ldm prepare-data`: packs any source into shards that read back identically, with a manifest."""
import json

import pytest

from ldm.cli import main as cli_main
from ldm.data import open_dataset
from ldm.data.pack import pack_shards, sha256_file


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_shapes_to_shards_and_back(tmp_path, fmt, capsys):
    out = tmp_path / fmt
    assert cli_main(["prepare-data", "shapes:11@32", "--out", str(out), "--format", fmt, "--shard-size", "4",
                     "--image-format", "png"]) == 0
    assert "wrote 11 samples in 3" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 11 and manifest["skipped"] == {} and [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert all(sha256_file(str(out / s["file"])) == s["sha256"] for s in manifest["shards"])
    original = sorted(s["caption"] for s in open_dataset("shapes:11@32"))
    packed = list(open_dataset(str(out), resolution=32))
    assert sorted(s["caption"] for s in packed) == original


def test_bad_samples_are_counted_in_the_manifest(tmp_path):
    (tmp_path / "src").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "src" / "ok.png")
    (tmp_path / "src" / "bad.jpg").write_bytes(b"")
    (tmp_path / "src" / "bad.txt").write_text("x")
    manifest = pack_shards(str(tmp_path / "src"), str(tmp_path / "out"), resolution=20, caption="a photo")
    assert manifest["count"] == 1 and manifest["skipped"] == {"empty_file": 1} and "empty_file" in manifest["reasons"]
    (sample,) = open_dataset(str(tmp_path / "out"), resolution=20)
    assert sample["caption"] == "a photo"


def test_shapes_to_folder(tmp_path):
    manifest = pack_shards("shapes:3", str(tmp_path), format="folder", image_format="png")
    assert manifest["count"] == 3 and len(list(open_dataset(str(tmp_path)))) == 3


def test_errors_before_any_work(tmp_path):
    assert cli_main(["prepare-data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="shard_size"):
        pack_shards("shapes:2", str(tmp_path / "o"), shard_size=0)
