"""Words-first tokenizer with character fallback: the Wave Field "character" benchmark tokenizer (spec wavefield.md §4).

Reference 09b58e5:tokenizers/field_tokenizer_v2.py (``FieldTokenizerV2(field_size=1024)``).  The id space is exactly
``vocab_size`` (1024) ids:

    0, 1, 2            <PAD>, <BOS>, <EOS>  (never emitted by encode; 0 doubles as the batch pad id)
    3 .. 3+C−1         characters: every character inside the training word tokens plus a fixed set, by code point
    then               trigrams, bigrams, multi-character words (words fill the slots first, by train frequency)

Text is lower-cased and split into word tokens (maximal runs of word characters, or single non-space non-word
characters).  Encoding is a greedy longest match trigram → bigram → word over that token sequence; a word outside
the vocabulary falls back to its characters, and characters outside the vocabulary are dropped (there is no UNK).
Perplexities measured with it are per token of this hybrid vocabulary, not per character.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>")
# Always in the character inventory, whether or not the training text uses them (spec §4).
FIXED_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789" + ".,!?;:'-\"()[]" + " ")
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
# decode removes the spaces before these characters
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+(?=[.,!?;:'\"])")
_FORMAT = "wordchar-v1"


def split_words(text: str) -> list[str]:
    """Lower-case, then maximal runs of word characters or single non-space non-word characters (spec §4)."""
    return _WORD_PATTERN.findall(text.lower())


def _ranked(counts: Counter, min_count: int) -> list[str]:
    # Descending frequency; Counter keeps first-seen order and the sort is stable, so ties keep first-seen order.
    return [item for item, count in counts.most_common() if count >= min_count]


class WordCharTokenizer:
    """Spec wavefield.md §4 tokenizer.  ``train`` on the filtered training lines, then ``encode``/``decode``.

    ``vocab_size`` is the size of the id space (the model's embedding rows), 1024 by default.  Training fills it
    completely whenever the text has enough distinct words, bigrams and trigrams (WikiText-2 has far more);
    on a tiny corpus the unfilled ids are simply never emitted.
    """

    kind = "wordchar"
    pad_id = 0
    # <EOS> (id 2) is reserved but the protocol adds no separators between documents (spec §4).
    eos_id = None

    def __init__(self, vocab_size: int = 1024) -> None:
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
        self._vocab_size = vocab_size
        self._set_vocab([], [], [], [])

    @classmethod
    def from_config(cls, cfg) -> "WordCharTokenizer":
        """Build an untrained tokenizer from a config mapping with an optional ``vocab_size`` key."""
        return cls(int(cfg.get("vocab_size", 1024)))

    def _set_vocab(self, characters: list[str], trigrams: list[str], bigrams: list[str], words: list[str]) -> None:
        self.characters, self.trigrams, self.bigrams, self.words = characters, trigrams, bigrams, words
        self.id_to_token = [*SPECIAL_TOKENS, *characters, *trigrams, *bigrams, *words]
        if len(self.id_to_token) > self._vocab_size:
            raise ValueError(f"{len(self.id_to_token)} tokens exceed vocab_size={self._vocab_size}")
        first_char, first_multi = len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(characters)
        self._char_ids = {c: first_char + i for i, c in enumerate(characters)}
        self._multi_ids = {t: first_multi + i for i, t in enumerate([*trigrams, *bigrams, *words])}
        self._first_multi_id = first_multi

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def trained(self) -> bool:
        return len(self.id_to_token) > len(SPECIAL_TOKENS)

    def train(self, texts: Iterable[str]) -> None:
        """Build the vocabulary from the training lines (each line one document; spec §4)."""
        lines = [split_words(text) for text in texts]
        char_counts: Counter = Counter()
        word_counts: Counter = Counter()
        for tokens in lines:
            for token in tokens:
                char_counts.update(token)
                if len(token) > 1:
                    word_counts[token] += 1
        if not word_counts and not char_counts:
            raise ValueError("cannot train the word/char tokenizer: the training text has no tokens")
        char_slots = self._vocab_size - len(SPECIAL_TOKENS)
        inventory = set(char_counts) | FIXED_CHARACTERS
        if len(inventory) > char_slots:
            inventory = set(sorted(inventory, key=lambda c: (-char_counts[c], c))[:char_slots])
        characters = sorted(inventory)

        free = char_slots - len(characters)
        words = _ranked(word_counts, 1)[:free]
        free -= len(words)
        bigrams: list[str] = []
        trigrams: list[str] = []
        if free > 0:  # only when word types run out (never on WikiText-2)
            bigram_counts = Counter(" ".join(t[k:k + 2]) for t in lines for k in range(len(t) - 1))
            bigrams = _ranked(bigram_counts, 2)[:free]
            free -= len(bigrams)
        if free > 0:
            trigram_counts = Counter(" ".join(t[k:k + 3]) for t in lines for k in range(len(t) - 2))
            trigrams = _ranked(trigram_counts, 2)[:free]
        self._set_vocab(characters, trigrams, bigrams, words)

    def encode(self, text: str) -> list[int]:
        """Greedy trigram → bigram → word match on the word tokens; unknown words fall back to characters."""
        if not self.trained:
            raise RuntimeError("WordCharTokenizer has no vocabulary yet: call train() or load() first")
        tokens = split_words(text)
        ids: list[int] = []
        position = 0
        while position < len(tokens):
            for span in (3, 2, 1):
                if position + span > len(tokens):
                    continue
                token_id = self._multi_ids.get(" ".join(tokens[position:position + span]))
                if token_id is not None:
                    ids.append(token_id)
                    position += span
                    break
            else:
                ids.extend(self._char_ids[c] for c in tokens[position] if c in self._char_ids)
                position += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Glue consecutive character tokens, space-separate the rest, drop spaces before . , ! ? ; : ' " (spec §4).

        Special ids and ids without a token (unfilled slots of a tiny vocabulary) carry no text and are skipped.
        """
        pieces: list[str] = []
        previous_was_char = False
        for token_id in ids:
            token_id = int(token_id)
            if not len(SPECIAL_TOKENS) <= token_id < len(self.id_to_token):
                continue
            token = self.id_to_token[token_id]
            is_char = token_id < self._first_multi_id
            if is_char and previous_was_char:
                pieces[-1] += token
            else:
                pieces.append(token)
            previous_was_char = is_char
        return _SPACE_BEFORE_PUNCTUATION.sub("", " ".join(pieces))

    def save(self, path: Path) -> None:
        payload = {"kind": self.kind, "format": _FORMAT, "vocab_size": self._vocab_size,
                   "characters": self.characters, "trigrams": self.trigrams, "bigrams": self.bigrams,
                   "words": self.words}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "WordCharTokenizer":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved WordCharTokenizer (format {payload.get('format')!r})")
        tokenizer = cls(payload["vocab_size"])
        tokenizer._set_vocab(payload["characters"], payload["trigrams"], payload["bigrams"], payload["words"])
        return tokenizer
