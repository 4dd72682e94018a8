"""CLIP tokenizers built offline (no downloads): byte-level ones for random-weight test models and
word-level ones for small worlds with a known vocabulary.

CLIP's BPE works on a byte-to-unicode alphabet: every byte is mapped to a printable character, so
that a vocabulary and a merges list can be plain text. The table is built here from its definition
(printable Latin-1 bytes map to themselves, the other 68 bytes to code points 256 and up, in byte
order) rather than imported from a transformers submodule whose location changes between releases.
"""

import json
import os
import tempfile
from typing import Dict, Iterable, List, Optional

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"


def bytes_to_unicode() -> Dict[int, str]:
    """byte value -> the printable character that stands for it in CLIP's vocabulary."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: Dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def byte_alphabet() -> List[str]:
    """The 256 base symbols in byte order."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _vocab_and_merges(words: Iterable[str]):
    """A vocabulary holding every byte symbol (alone and word-final), the given whole words and the
    merge chain that builds each word left to right, so that BPE turns a known word into one token
    and anything else into its characters."""
    alphabet = byte_alphabet()
    vocab: Dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + WORD_END, len(vocab))
    merges: List[str] = []
    seen = set()
    for word in words:
        table = bytes_to_unicode()
        symbols = [table[b] for b in word.encode("utf-8")]
        if len(symbols) < 2:
            continue
        symbols[-1] += WORD_END
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def write_clip_tokenizer_files(folder: str, words: Iterable[str] = (), special_ids: Optional[Dict[str, int]] = None) -> None:
    """vocab.json and merges.txt of a CLIP tokenizer (see _vocab_and_merges). `special_ids` may pin
    the ids of the start/end tokens (the real CLIP uses 49406 / 49407); by default they follow the
    vocabulary."""
    vocab, merges = _vocab_and_merges(words)
    if special_ids:
        filler = 0
        while len(vocab) < min(special_ids.values()):
            vocab[f"<|unused{filler}|>"] = len(vocab)
            filler += 1
        for token, index in sorted(special_ids.items(), key=lambda item: item[1]):
            vocab[token] = index
    else:
        vocab[START_TOKEN] = len(vocab)
        vocab[END_TOKEN] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in merges:
            f.write(merge + "\n")


def clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77, special_ids: Optional[Dict[str, int]] = None):
    """A transformers CLIPTokenizer over byte symbols plus the given whole words."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder, words, special_ids)
        return CLIPTokenizer(
            os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
            pad_token=END_TOKEN, model_max_length=model_max_length,
        )
