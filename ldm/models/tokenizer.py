"""The CLIP BPE tokenizer, built offline from the vocabulary that ships inside open_clip_torch.

Stable Diffusion 1.x uses OpenAI's CLIP tokenizer (pad with <|endoftext|>), 2.x the same BPE table padded
with "!" (id 0). Both are exactly the table in `open_clip/bpe_simple_vocab_16e6.txt.gz`; this module turns it
into a transformers `CLIPTokenizer` and a normal `tokenizer/` folder (vocab.json, merges.txt, tokenizer.json).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP kept; vocab = 2 * 256 bytes + merges + 2 specials = 49408


def bpe_path() -> str:
    """Returns the path of the BPE table inside the installed open_clip_torch wheel."""
    spec = importlib.util.find_spec("open_clip")  # locate without importing: open_clip's import takes seconds
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed; it ships the CLIP vocabulary: pip install open_clip_torch")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode() -> dict[int, str]:
    """Returns GPT-2's reversible map from the 256 byte values to printable unicode characters (CLIP reuses it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Returns CLIP's token->id table (49408 entries) and its ordered BPE merges, as open_clip builds them."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """Returns Stable Diffusion's CLIP tokenizer, built without network access.

    pad_token: "<|endoftext|>" for SD 1.x (id 49407), "!" for SD 2.x (id 0).
    """
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; use {EOS!r} (SD 1.x) or '!' (SD 2.x)")
    merge_pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=merge_pairs, pad_token=pad_token, model_max_length=model_max_length)


def save_clip_tokenizer(tokenizer: CLIPTokenizer, folder: str) -> None:
    """Writes `tokenizer` as a `tokenizer/` folder that transformers 4.x and 5.x, and diffusers, all open."""
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    # Older transformers read the slow tokenizer's files; write them too so the folder opens everywhere.
    vocab, merges = tokenizer.get_vocab(), clip_vocab_and_merges()[1]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
