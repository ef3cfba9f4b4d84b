"""Words-first tokenizer with character fallback (spec wavefield.md §4), on the real WikiText-2 valid split."""
from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest

from wavetrain.data.wordchar import FIXED_CHARACTERS, SPECIAL_TOKENS, WordCharTokenizer, split_words

WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw.gz"


@pytest.fixture(scope="module")
def valid_lines() -> list[str]:
    """Filtered WikiText-2 raw valid lines: stripped, non-empty, no "=" headings (spec §4)."""
    if not WIKITEXT_VALID.is_file():
        pytest.skip(f"real-data fixture needs {WIKITEXT_VALID} (the shared/data folder beside the repository)")
    with gzip.open(WIKITEXT_VALID, "rt", encoding="utf-8") as handle:
        text = handle.read().replace("\r\n", "\n")
    lines = [line.strip() for line in text.split("\n")]
    return [line for line in lines if line and not line.startswith("=")]


@pytest.fixture(scope="module")
def tokenizer(valid_lines: list[str]) -> WordCharTokenizer:
    tokenizer = WordCharTokenizer()
    tokenizer.train(valid_lines)
    return tokenizer


def test_vocabulary_has_exactly_1024_ids_in_spec_order(tokenizer, valid_lines):
    assert tokenizer.vocab_size == 1024
    assert len(tokenizer.id_to_token) == 1024
    assert tokenizer.id_to_token[:3] == ["<PAD>", "<BOS>", "<EOS>"] and tokenizer.pad_id == 0
    chars = tokenizer.characters
    assert chars == sorted(chars) and FIXED_CHARACTERS <= set(chars)
    assert tokenizer.id_to_token[3:3 + len(chars)] == chars
    # WikiText-2 has far more word types than free slots: no bigram or trigram phase
    assert tokenizer.trigrams == [] and tokenizer.bigrams == []
    assert len(tokenizer.words) == 1021 - len(chars)
    word_counts = Counter(w for line in valid_lines for w in split_words(line) if len(w) > 1)
    expected = [w for w, _ in word_counts.most_common(len(tokenizer.words))]
    assert tokenizer.words == expected
    assert tokenizer.words[0] == "the"


def test_encoded_ids_stay_in_the_vocabulary(tokenizer, valid_lines):
    ids = [i for line in valid_lines[:300] for i in tokenizer.encode(line)]
    assert ids and min(ids) >= len(SPECIAL_TOKENS) and max(ids) < tokenizer.vocab_size


def test_in_vocabulary_text_round_trips(tokenizer):
    text = "the first of the two, and it was not in the city ( or the school )."
    for word in split_words(text):
        assert word in tokenizer.words or word in tokenizer.characters, f"precondition: {word!r} in vocabulary"
    ids = tokenizer.encode(text)
    assert len(ids) == len(split_words(text))  # one id per word token, no fallback
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0, 1, 2, *ids, 0, 0]) == text  # special / pad ids carry no text


def test_unknown_words_fall_back_to_characters(tokenizer):
    unknown = "qzxjvkw"
    assert unknown not in tokenizer.words
    ids = tokenizer.encode(f"the {unknown} city")
    char_ids = [tokenizer.id_to_token.index(c) for c in unknown]
    assert ids == [tokenizer.encode("the")[0], *char_ids, tokenizer.encode("city")[0]]
    assert tokenizer.decode(ids) == f"the {unknown} city"
    assert tokenizer.encode("The CITY") == tokenizer.encode("the city")  # lower-cased first
    absent = "\U0001F600"
    assert absent not in tokenizer.characters
    assert tokenizer.encode(f"the {absent} city") == tokenizer.encode("the city")  # dropped, never UNK
    assert tokenizer.decode(tokenizer.encode("it wasn't")) == "it wasn't"  # "'" then "t" glue as characters


def test_training_is_deterministic_and_save_load_round_trips(tokenizer, valid_lines, tmp_path):
    again = WordCharTokenizer()
    again.train(valid_lines)
    assert again.id_to_token == tokenizer.id_to_token
    path = tmp_path / "wordchar.json"
    tokenizer.save(path)
    loaded = WordCharTokenizer.load(path)
    assert loaded.id_to_token == tokenizer.id_to_token and loaded.vocab_size == 1024
    sample = " ".join(valid_lines[:20])
    assert loaded.encode(sample) == tokenizer.encode(sample)


def test_bigram_and_trigram_phases_when_word_types_run_out():
    tokenizer = WordCharTokenizer(vocab_size=70)
    tokenizer.train(["ab cd ab cd ab", "cd ab cd"])
    n_chars = len(FIXED_CHARACTERS)
    assert len(tokenizer.characters) == n_chars
    assert tokenizer.words == ["ab", "cd"]  # "ab" seen first, both 5 times
    assert tokenizer.bigrams == ["ab cd", "cd ab"]  # 3 each, frequency >= 2
    assert tokenizer.trigrams == ["ab cd ab", "cd ab cd"]  # 2 each
    first = len(SPECIAL_TOKENS) + n_chars
    assert tokenizer.id_to_token[first:] == ["ab cd ab", "cd ab cd", "ab cd", "cd ab", "ab", "cd"]
    assert tokenizer.encode("ab cd ab cd") == [first, first + 5]  # greedy: trigram, then the word
    assert tokenizer.decode(tokenizer.encode("ab cd ab cd")) == "ab cd ab cd"
    assert tokenizer.vocab_size == 70 and max(tokenizer.encode("cd ab cd ab")) < 70


def test_character_inventory_is_capped_by_frequency():
    tokenizer = WordCharTokenizer(vocab_size=20)
    tokenizer.train(["zzzz yyy xx w", "zz yy"])
    assert len(tokenizer.characters) == 17 and tokenizer.words == []
    assert {"z", "y", "x", "w"} <= set(tokenizer.characters)
    # all-character output glues into one run: decoding is lossy by design (spec §4, generation only)
    assert tokenizer.decode(tokenizer.encode("zzzz yyy xx w")) == "zzzzyyyxxw"


def test_untrained_tokenizer_refuses_to_encode():
    with pytest.raises(RuntimeError, match="train"):
        WordCharTokenizer().encode("text")
    with pytest.raises(ValueError, match="vocab_size"):
        WordCharTokenizer(vocab_size=3)
