"""Word-level text tokenizer on the ``tokenizers`` library.

The built-in worlds speak a small closed language (plans, prompts, questions), so one id per word is
enough and makes every answer exactly comparable. Special tokens come first with fixed ids, so model code can
rely on them without looking anything up, and the vocabulary is sorted, so the same words always give the same
ids (a checkpoint's tokenizer can be rebuilt bit for bit).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<img>", "</img>", "<image>"]
"""Special tokens; their ids are their positions here (0..6)."""

FILENAME = "tokenizer.json"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace split, then every punctuation character becomes its own word ("why?" -> "why", "?").
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_tokenizer(words: Iterable[str]) -> TextTokenizer:
    """A WordLevel tokenizer over ``words`` (single words or whole texts: each is split like ``encode`` does).

    The vocabulary is ``SPECIALS`` followed by the sorted distinct words, so the build is deterministic.
    """
    pre = _pre_tokenizer()
    found: set[str] = set()
    for i, w in enumerate(words):
        if not isinstance(w, str):
            raise TypeError(f"build_tokenizer: words[{i}] must be str, got {type(w).__name__}")
        found.update(piece for piece, _ in pre.pre_tokenize_str(w))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted(found - set(SPECIALS)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    # Registered as special so "<img>" in a text is matched whole instead of split at the punctuation.
    tok.add_special_tokens(SPECIALS)
    return TextTokenizer(tok)


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the ids the model needs as properties.

    ``encode`` adds no <bos>/<eos>: the sequence builders (packing, generation) place those themselves.
    """

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        for i, s in enumerate(SPECIALS):
            if tokenizer.token_to_id(s) != i:
                raise ValueError(f"tokenizer: special token {s!r} must have id {i}, "
                                 f"got {tokenizer.token_to_id(s)}")
        self.tokenizer = tokenizer
        self._skip = {i for i, s in enumerate(SPECIALS) if s != "<unk>"}

    # ids of the specials, fixed by their order in SPECIALS
    pad_id = property(lambda self: 0)
    unk_id = property(lambda self: 1)
    bos_id = property(lambda self: 2)
    eos_id = property(lambda self: 3)
    img_start_id = property(lambda self: 4)
    img_end_id = property(lambda self: 5)
    image_id = property(lambda self: 6)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``; unknown words map to <unk>."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (each once, in order of appearance)."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(dict.fromkeys(text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == self.unk_id))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Words joined by single spaces. ``skip_special`` drops every special except <unk>, which stays
        visible so two different unknown answers never normalise to the same empty string."""
        words = []
        for i, t in enumerate(ids):
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"decode: ids[{i}]={t} is outside the vocabulary [0, {self.vocab_size})")
            if skip_special and t in self._skip:
                continue
            words.append(self.tokenizer.id_to_token(t))
        return " ".join(words)

    def normalize(self, text: str) -> str:
        """Canonical form for comparing answers: ``decode(encode(text))``."""
        return self.decode(self.encode(text))

    def user_turn(self, items: list) -> list:
        """A user's items (text and images) as the model reads a user turn: the built-in language has no chat
        format, so as they are (``HFTokenizer.user_turn`` wraps them in a pretrained model's template)."""
        return list(items)

    def extended(self, words: Iterable[str]) -> TextTokenizer:
        """This tokenizer plus the words of ``words`` it lacks, after its own: every known word keeps its id, so a
        trained model reads its old texts the same (``LatentUMModel.grow_vocabulary`` adds the rows)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        pre = _pre_tokenizer()
        new = sorted({piece for w in words for piece, _ in pre.pre_tokenize_str(w)} - set(vocab))
        for w in new:
            vocab[w] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre
        tok.add_special_tokens(SPECIALS)
        return TextTokenizer(tok)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def save(self, folder: str | os.PathLike) -> str:
        """Write ``folder/tokenizer.json`` (the folder is created) and return its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, FILENAME)
        self.tokenizer.save(path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TextTokenizer:
        path = os.path.join(folder, FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TextTokenizer.load: no {FILENAME} in folder {str(folder)!r}")
        return cls(Tokenizer.from_file(path))

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"
