"""Byte-level BPE for text packs: learn merges on the train split, encode, decode.

    gentrain data pack corpus.txt --out data/corpus --seq-len 512 --bpe-vocab 4096
    gentrain data pack other.txt --out data/other --seq-len 512 --bpe-merges data/corpus/merges.txt

Tokens 0..255 are the bytes of UTF-8 text; token 256 + k is merge k, the
concatenation of its two parts' bytes. Text is first cut into pre-tokens (a
word with its leading space, a run of digits, a run of punctuation, a run of
whitespace; see PRETOKEN), and merges never cross a pre-token's edge, so the
same word always encodes the same way wherever it stands.

Learning (`learn_merges`): count each distinct pre-token once with its
frequency, count adjacent pairs over that table, and merge the most frequent
pair; ties go to the smallest (left id, right id). After a merge only the
pre-tokens that held the pair are recounted, and a heap with lazy deletion
finds the next most frequent pair, so a merge costs the words it touches, not
the whole table. Encoding applies merges in the order they were learnt, which
reproduces the learnt segmentation of every train pre-token exactly.

The merges file (`merges.txt` in a pack folder) is text: the line
`#gentrain-bpe 1`, then one merge per line as `LEFT RIGHT` token ids.
`read_merges` also reads a GPT-2 style pair (`merges.txt` of space-separated
byte-to-unicode strings beside a `vocab.json`), see `read_gpt2_merges`.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

BYTE_TOKENS = 256
MERGES_HEADER = "#gentrain-bpe 1"
MERGES_NAME = "merges.txt"
# Contractions, letters (with one leading space), digits, other symbols, whitespace
# (a run of spaces keeps its last space for the word that follows), and any single
# character as a last resort, so the pieces always concatenate back to the text.
PRETOKEN = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|[\s\S]"
)


class BpeError(ValueError):
    """A merges file or BPE setting that cannot be used."""


def pretokens(text: str) -> list[str]:
    """The pre-tokens of `text`; `"".join(pretokens(text)) == text`."""
    return PRETOKEN.findall(text)


@dataclass
class Bpe:
    """Merges learnt (or read) in order; merge k makes token 256 + k."""

    merges: list[tuple[int, int]]
    _ranks: dict = field(default_factory=dict, repr=False)
    _pieces: list = field(default_factory=list, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.merges = [(int(a), int(b)) for a, b in self.merges]
        self._pieces = [bytes([i]) for i in range(BYTE_TOKENS)]
        for number, (left, right) in enumerate(self.merges):
            new = BYTE_TOKENS + number
            if not (0 <= left < new and 0 <= right < new):
                raise BpeError(f"merge {number} ({left} {right}) names a token not made before it "
                               f"(tokens 0..{new - 1} exist then); the merges file is corrupt")
            self._pieces.append(self._pieces[left] + self._pieces[right])
            self._ranks.setdefault((left, right), number)

    @property
    def vocab_size(self) -> int:
        return BYTE_TOKENS + len(self.merges)

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token]

    def token_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for, int64 [vocab_size]."""
        return np.array([len(piece) for piece in self._pieces], dtype=np.int64)

    def encode_piece(self, piece: bytes) -> list[int]:
        """One pre-token's bytes -> tokens, merging the earliest-learnt adjacent pair first."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece)
        ranks = self._ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            word = _merge_word(word, best, BYTE_TOKENS + best_rank)
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as int64 [n], held as 4 bytes a token while it grows (long texts)."""
        tokens = array.array("I")
        for match in PRETOKEN.finditer(text):
            tokens.extend(self.encode_piece(match.group().encode("utf-8")))
        return np.frombuffer(tokens, dtype=np.uint32).astype(np.int64)

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return b"".join(self._pieces[int(t)] for t in tokens)

    def decode(self, tokens: Iterable[int], errors: str = "strict") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def merges_text(self) -> str:
        return MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in self.merges)

    def sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.merges_text().encode("ascii")).hexdigest()


def _merge_word(word: Sequence[int], pair: tuple[int, int], new: int) -> list[int]:
    """Every non-overlapping occurrence of `pair`, left to right, replaced by `new`."""
    out, i, n = [], 0, len(word)
    left, right = pair
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _pairs(word: Sequence[int]) -> Counter:
    return Counter(zip(word, word[1:]))


def learn_merges(text: str, vocab_size: int) -> Bpe:
    """Merges learnt on `text` until the vocabulary holds `vocab_size` tokens, or fewer when
    every pre-token is down to one token (no adjacent pair is left to merge)."""
    if vocab_size < BYTE_TOKENS + 1:
        raise BpeError(f"--bpe-vocab {vocab_size} must be at least {BYTE_TOKENS + 1} (the 256 bytes and one merge); "
                       "leave it out to pack plain bytes")
    frequencies = Counter(match.group().encode("utf-8") for match in PRETOKEN.finditer(text))
    words = [list(piece) for piece in frequencies]
    counts = list(frequencies.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for number, word in enumerate(words):
        for pair, times in _pairs(word).items():
            pair_counts[pair] += times * counts[number]
            where[pair].add(number)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - BYTE_TOKENS and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # stale: the pair's count changed after this entry was pushed
        new = BYTE_TOKENS + len(merges)
        merges.append(pair)
        changed = set()
        for number in sorted(where.pop(pair)):
            word, times = words[number], counts[number]
            for old, k in _pairs(word).items():
                pair_counts[old] -= k * times
                changed.add(old)
                if old != pair:
                    where[old].discard(number)
            word = words[number] = _merge_word(word, pair, new)
            for fresh, k in _pairs(word).items():
                pair_counts[fresh] += k * times
                where[fresh].add(number)
                changed.add(fresh)
        pair_counts.pop(pair, None)
        for other in changed:
            count = pair_counts.get(other, 0)
            if count > 0:
                heapq.heappush(heap, (-count, other))
            else:
                pair_counts.pop(other, None)
                where.pop(other, None)
    return Bpe(merges)


def parse_merges(text: str, where: str) -> Bpe:
    """The gentrain merges format (see the module docstring)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != MERGES_HEADER:
        raise BpeError(f"{where} does not start with {MERGES_HEADER!r}; give a merges.txt that "
                       "`gentrain data pack --bpe-vocab` wrote (or a GPT-2 merges.txt with vocab.json beside it)")
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise BpeError(f"{where} line {number}: {line!r} is not two token ids `LEFT RIGHT`")
        merges.append((int(parts[0]), int(parts[1])))
    return Bpe(merges)


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte: printable Latin-1
    bytes stand for themselves, the other 68 map in byte order to U+0100, U+0101, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {chr(byte): byte for byte in keep}
    extra = 0
    for byte in range(BYTE_TOKENS):
        if byte not in table.values():
            table[chr(BYTE_TOKENS + extra)] = byte
            extra += 1
    return table


def read_gpt2_merges(merges_path: Path, vocab_path: Path) -> tuple[Bpe, dict[int, int]]:
    """A GPT-2 style `merges.txt` (a `#version` line, then `LEFT RIGHT` strings in GPT-2's
    byte alphabet) -> our merges, and the map from our token ids to the ids of `vocab.json`.

    Our ids differ from GPT-2's (ours: bytes 0..255 then merges in order), so a pack made this
    way reproduces GPT-2's segmentation (up to pre-tokenisation, which here is the standard
    `re` approximation of GPT-2's pattern) but not its id numbering; the map is returned for
    anyone who needs it.
    """
    alphabet = gpt2_byte_alphabet()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))

    def to_bytes(symbol: str, line: int) -> bytes:
        try:
            return bytes(alphabet[char] for char in symbol)
        except KeyError as error:
            raise BpeError(f"{merges_path} line {line}: {error.args[0]!r} is not in GPT-2's byte alphabet") from None

    ids = {bytes([byte]): byte for byte in range(BYTE_TOKENS)}
    merges = []
    for number, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise BpeError(f"{merges_path} line {number}: {line!r} is not two symbols `LEFT RIGHT`")
        left, right = to_bytes(parts[0], number), to_bytes(parts[1], number)
        if left not in ids or right not in ids:
            raise BpeError(f"{merges_path} line {number}: {line!r} merges a symbol no earlier line made")
        merges.append((ids[left], ids[right]))
        ids.setdefault(left + right, BYTE_TOKENS + len(merges) - 1)
    by_bytes = {to_bytes(symbol, 0): int(index) for symbol, index in vocab.items()}
    bpe = Bpe(merges)
    mapping = {token: by_bytes[bpe.token_bytes(token)] for token in range(bpe.vocab_size)
               if bpe.token_bytes(token) in by_bytes}
    return bpe, mapping


def read_merges(path) -> Bpe:
    """A merges file: ours, or GPT-2's `merges.txt` when a `vocab.json` lies beside it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BpeError(f"--bpe-merges {path}: no such file; give the merges.txt of an earlier "
                       "`gentrain data pack --bpe-vocab` (it lies in that pack's folder)")
    text = path.read_text(encoding="utf-8")
    if text.startswith(MERGES_HEADER):
        return parse_merges(text, str(path))
    if (path.parent / "vocab.json").is_file():
        return read_gpt2_merges(path, path.parent / "vocab.json")[0]
    return parse_merges(text, str(path))
