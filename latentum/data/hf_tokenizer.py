"""The pretrained model's own tokenizer, behind the ``TextTokenizer`` interface (issue #29, item 3).

A real LM backbone was trained on its own sub-word vocabulary and chat format, so its text must go through
that tokenizer (``transformers``, loaded from a local folder) and its chat template; only the tiny built-in
model keeps the word-level ``TextTokenizer``. Image spans follow InternVL's conventions: ``<img>``, one
``<IMG_CONTEXT>`` per latent cell, ``</img>``. Their ids are looked up in the tokenizer, never hard-coded.

``load_tokenizer`` lives here, not in ``tokenizer.py``, so imports point one way (this module imports that one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from latentum.data.tokenizer import FILENAME, TextTokenizer

IMG_START = "<img>"
IMG_END = "</img>"
IMAGE = "<IMG_CONTEXT>"
"""Image special tokens (InternVL names): span start, span end, and one latent cell inside the span."""

CONFIG_FILENAME = "tokenizer_config.json"
"""Written by ``save_pretrained``; its presence marks a ``transformers`` tokenizer folder."""


def add_image_tokens(tokenizer: PreTrainedTokenizerBase,
                     names: Sequence[str] = (IMG_START, IMG_END, IMAGE)) -> int:
    """Add the image tokens to a plain LM tokenizer as special tokens; return how many were new.

    The new ids come after the LM's vocabulary, so the model's input and output embeddings must then be
    resized (``model.resize_token_embeddings(len(tokenizer))``) before these ids are fed or predicted.
    ``add_tokens(special_tokens=True)`` is used rather than ``add_special_tokens`` because it leaves the
    tokenizer's own extra specials (Qwen's ``<|im_start|>`` ...) registered on every transformers version.
    """
    return tokenizer.add_tokens(list(names), special_tokens=True)


class HFTokenizer:
    """A ``transformers`` tokenizer with the ids the model needs as properties, like ``TextTokenizer``.

    ``encode`` adds no special tokens: the sequence builders (packing, generation) place ``bos_id`` first and
    ``eos_id`` last themselves. Chat models have no BOS (Qwen, InternVL): ``bos_id`` is then None and sequences
    start with their first real token, as the pretrained model saw them. ``eos_id`` is the tokenizer's eos, which
    for chat models is the end-of-turn token (Qwen: ``<|im_end|>``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, img_start: str = IMG_START,
                 img_end: str = IMG_END, image: str = IMAGE):
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers PreTrainedTokenizerBase, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        name = tokenizer.name_or_path or type(tokenizer).__name__
        ids = []
        for tok in (img_start, img_end, image):
            got = tokenizer.encode(tok, add_special_tokens=False)
            if len(got) != 1 or tokenizer.convert_ids_to_tokens(got[0]) != tok:
                raise ValueError(f"tokenizer {name!r} lacks image token {tok!r}: expected it as one added token "
                                 f"(add_image_tokens, then resize the model's embeddings)")
            ids.append(got[0])
        self._img_start_id, self._img_end_id, self._image_id = ids
        self._eos_id = tokenizer.eos_token_id
        if self._eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token: expected one to end a turn")
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos_id
        self._bos_id = tokenizer.bos_token_id  # None: no BOS (the builders then put nothing first)
        self._unk_id = tokenizer.unk_token_id
        # skip_special drops every special except <unk> (as TextTokenizer does); the image tokens may have
        # been added as non-special, so they are listed explicitly.
        self._skip = (set(tokenizer.all_special_ids) | set(ids)) - {self._unk_id}

    pad_id = property(lambda self: self._pad_id)
    unk_id = property(lambda self: self._unk_id)
    bos_id = property(lambda self: self._bos_id)
    eos_id = property(lambda self: self._eos_id)
    img_start_id = property(lambda self: self._img_start_id)
    img_end_id = property(lambda self: self._img_end_id)
    image_id = property(lambda self: self._image_id)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens (HF's ``.vocab_size`` leaves the added ones out)."""
        return len(self.tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added; special tokens written in the text stay whole."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def unknown_words(self, text: str) -> list[str]:
        """The whitespace-separated words of ``text`` with a piece that hits <unk> (each once, in order).

        A byte-level BPE (Qwen, GPT-2) encodes any text, so it has no unknown words and this is ``[]``.
        """
        if self.unk_id is None:
            return []
        return list(dict.fromkeys(w for w in text.split() if self.unk_id in self.encode(w)))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The HF decode of ``ids`` (which rejoins sub-word pieces), stripped. ``skip_special`` drops every
        special except <unk>, which stays visible so two different unknown answers never normalise alike."""
        keep = []
        for i, t in enumerate(ids):
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"decode: ids[{i}]={t} is outside the vocabulary [0, {self.vocab_size})")
            if not (skip_special and t in self._skip):
                keep.append(t)
        return self.tokenizer.decode(keep, skip_special_tokens=False).strip()

    def normalize(self, text: str) -> str:
        """Canonical form for comparing answers: ``decode(encode(text))`` with whitespace runs collapsed to
        one space, as ``TextTokenizer.normalize`` does by joining words."""
        return " ".join(self.decode(self.encode(text)).split())

    def chat_text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``messages`` (``{"role", "content"}`` dicts) rendered by the tokenizer's chat template; with
        ``add_generation_prompt`` it ends with the assistant header, ready for generation."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"chat: tokenizer {self.tokenizer.name_or_path!r} has no chat template")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of ``chat_text``. Rendered to text first and then encoded, because
        ``apply_chat_template(tokenize=True)`` returns a list in transformers 4 but a dict in 5."""
        return self.encode(self.chat_text(messages, add_generation_prompt))

    def user_turn(self, items: list) -> list:
        """A user's items (text and images) wrapped in the chat template as one user message, ready for the
        assistant's reply (InternVL: ``<|im_start|>user\n`` ... ``<|im_end|>\n<|im_start|>assistant\n``, with the
        template's system block if it has one); as they are when the tokenizer has no template. Images stay items:
        the sequence builders frame them with the image tokens."""
        if not self.tokenizer.chat_template:
            return list(items)
        mark = "\x00user-items\x00"
        before, _, after = self.chat_text([{"role": "user", "content": mark}]).partition(mark)
        if not _:
            raise ValueError(f"user_turn: the chat template of {self.tokenizer.name_or_path!r} drops the message "
                             "content; expected it to render the user's content")
        # InternVL writes a newline after each image (``<image>\n`` + question).
        framed = [y for x in items for y in ((x,) if isinstance(x, str) else (x, "\n"))]
        return [x for x in (before, *framed, after) if not (isinstance(x, str) and x == "")]

    def token_to_id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        # HF maps a missing token to <unk> (or None); report it missing, like tokenizers.Tokenizer does.
        return None if i is None or (i == self.unk_id and token != self.tokenizer.unk_token) else i

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.convert_ids_to_tokens(int(i)) if 0 <= int(i) < self.vocab_size else None

    def save(self, folder: str | os.PathLike) -> str:
        """``save_pretrained`` into ``folder`` (created) and return the path of its ``tokenizer_config.json``.

        The image token names are not stored: load with the same names if they are not the defaults."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        return os.path.join(folder, CONFIG_FILENAME)

    @classmethod
    def load(cls, folder: str | os.PathLike, img_start: str = IMG_START, img_end: str = IMG_END,
             image: str = IMAGE) -> HFTokenizer:
        """The tokenizer saved in local ``folder``; never downloads and never runs code from the folder."""
        if not os.path.isfile(os.path.join(folder, CONFIG_FILENAME)):
            raise FileNotFoundError(f"HFTokenizer.load: no {CONFIG_FILENAME} in folder {str(folder)!r}")
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(tok, img_start, img_end, image)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.tokenizer.name_or_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(folder: str | os.PathLike) -> HFTokenizer | TextTokenizer:
    """The tokenizer saved in ``folder``: a ``transformers`` one if ``tokenizer_config.json`` is there
    (a real pretrained model), else the built-in ``TextTokenizer`` from ``tokenizer.json``.

    The config file decides because ``save_pretrained`` also writes a ``tokenizer.json``.
    """
    if os.path.isfile(os.path.join(folder, CONFIG_FILENAME)):
        return HFTokenizer.load(folder)
    if os.path.isfile(os.path.join(folder, FILENAME)):
        return TextTokenizer.load(folder)
    raise FileNotFoundError(f"load_tokenizer: folder {str(folder)!r} holds neither {CONFIG_FILENAME} "
                            f"(transformers) nor {FILENAME} (TextTokenizer)")


AnyTokenizer = TextTokenizer | HFTokenizer
"""Either tokenizer: both expose the same ids and methods (the sequence builders need nothing else)."""
