"""Rebuild `clip-tokenizer/vocab.json` and `merges.txt` (the CLIP BPE, as transformers' CLIPTokenizer
reads it) from the merges open-clip-torch ships, offline:

    pip install --no-deps open_clip_torch==3.3.0
    python -m soup_ui.configs.build_clip_tokenizer

The construction is OpenAI's `SimpleTokenizer`'s (and open_clip's): the 256 byte symbols, the same
with `</w>`, one token per merge (the first 48,894 merges of the file), then `<|startoftext|>` and
`<|endoftext|>`: 49,408 tokens, the vocabulary of every Stable Diffusion text encoder
(tests/test_families.py checks the ids against open_clip's tokenizer)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "clip-tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> None:
    origin = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    lines = gzip.open(origin / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
