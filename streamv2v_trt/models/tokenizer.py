"""CLIP tokenizer built offline from the BPE merges that CLIP (and open_clip) publish.

Hugging Face's vocab.json/merges.txt for the SD text encoders are derived from this exact file, so the
token ids match the real tokenizers without any download.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from ..presets import CONFIG_DIR

BPE_FILE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _vocab_files() -> tuple[str, str]:
    merges = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(tempfile.mkdtemp(prefix="streamv2v-clip-vocab-"))
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(out / "vocab.json"), str(out / "merges.txt")


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    vocab, merges = _vocab_files()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)
