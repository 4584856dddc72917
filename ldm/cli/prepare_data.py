"""`ldm prepare-data SRC --out DIR --format webdataset|parquet|folder`: pack any source into shards + manifest.json."""
from __future__ import annotations

import json

from ldm.ranges import int_in


def add_arguments(parser) -> None:
    parser.add_argument("src", help="data spec: shapes:N[@R], a folder, .tar shards, .parquet, COCO .json, hf folder")
    parser.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    parser.add_argument("--format", default="webdataset", choices=("webdataset", "parquet", "folder"))
    parser.add_argument("--shard-size", type=int_in("[1, 1e7]"), default=1000, help="samples per shard")
    parser.add_argument("--resolution", type=int_in("[8, 8192]"), default=None,
                        help="resize the shorter side to R px (no crop)")
    parser.add_argument("--image-format", default="jpg", choices=("jpg", "png"))
    parser.add_argument("--quality", type=int_in("[0, 100]"), default=95, help="JPEG quality")
    parser.add_argument("--caption", default=None, help="instance prompt or '{name}' template for folders")
    parser.add_argument("--caption-column", default=None, help="caption column / json key (default text/caption)")
    parser.add_argument("--image-dir", default=None, help="COCO image folder (default: inferred)")


def run(args) -> int:
    from ldm.data.pack import pack_shards

    manifest = pack_shards(args.src, args.out, format=args.format, shard_size=args.shard_size,
                           resolution=args.resolution, image_format=args.image_format, quality=args.quality,
                           caption=args.caption, caption_column=args.caption_column, image_dir=args.image_dir)
    print(f"wrote {manifest['count']} samples in {len(manifest['shards'])} {args.format} shard(s) to {args.out}; "
          f"skipped {sum(manifest['skipped'].values())}: {json.dumps(manifest['skipped'])}")
    return 0
