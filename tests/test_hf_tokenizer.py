"""The real tokenizer (issue #29, item 3): a pretrained model's ``transformers`` tokenizer behind the
``TextTokenizer`` interface, with its chat template and the InternVL image tokens. Everything is built here,
offline: a tiny byte-level BPE with Qwen-style specials stands in for Qwen/InternVL."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from latentum.data.hf_tokenizer import IMAGE, IMG_END, IMG_START, HFTokenizer, add_image_tokens, load_tokenizer
from latentum.data.tokenizer import TextTokenizer, build_tokenizer

SENTENCES = ["a red circle left of the blue square", "Is the circle red? Yes.", "the answer is No, 2 squares"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _lm_tokenizer() -> PreTrainedTokenizerFast:
    """A plain chat LM tokenizer like Qwen's: byte-level BPE, no BOS, <|im_end|> ends a turn, no image tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=TEMPLATE)


@pytest.fixture
def folder(tmp_path):
    hf = _lm_tokenizer()
    assert add_image_tokens(hf) == 3
    hf.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_load_gives_hf_tokenizer_with_ids_from_the_tokenizer(folder):
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    hf = tok.tokenizer
    assert [tok.img_start_id, tok.img_end_id, tok.image_id] == hf.convert_tokens_to_ids([IMG_START, IMG_END, IMAGE])
    assert len({tok.img_start_id, tok.img_end_id, tok.image_id}) == 3
    assert tok.eos_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_id is None  # no BOS in a Qwen-style tokenizer: sequences start with their first token
    assert tok.unk_id is None
    assert tok.vocab_size == len(tok) == len(hf) and tok.image_id < tok.vocab_size
    assert tok.token_to_id(IMAGE) == tok.image_id and tok.id_to_token(tok.image_id) == IMAGE
    assert tok.token_to_id("<never-seen>") is None and tok.id_to_token(tok.vocab_size) is None
    assert "HFTokenizer" in repr(tok)


def test_encode_decode_round_trip_and_image_tokens_whole(folder):
    tok = load_tokenizer(folder)
    text = "Is the red square left of 7 circles? Ünïcode too."  # unseen words and bytes still encode
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.unknown_words(text) == []
    assert tok.normalize("  the   blue\nsquare ") == "the blue square"
    ids = tok.encode(f"a {IMG_START}{IMAGE}{IMAGE}{IMG_END} b")
    assert ids.count(tok.img_start_id) == ids.count(tok.img_end_id) == 1 and ids.count(tok.image_id) == 2
    assert ids[ids.index(tok.img_start_id) + 1:ids.index(tok.img_end_id)] == [tok.image_id] * 2
    assert tok.decode(ids).split() == ["a", "b"]  # specials skipped
    assert IMG_START in tok.decode(ids, skip_special=False)
    assert tok.decode([tok.pad_id] + tok.encode("Yes") + [tok.eos_id]) == "Yes"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_chat_template_gives_the_qwen_prompt(folder):
    tok = load_tokenizer(folder)
    messages = [{"role": "user", "content": f"Is it red? {IMG_START}{IMAGE}{IMG_END}"}]
    want = f"<|im_start|>user\nIs it red? {IMG_START}{IMAGE}{IMG_END}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_text(messages) == want
    ids = tok.chat(messages)
    assert ids == tok.encode(want)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.eos_id) == 1
    assert ids.count(tok.image_id) == 1
    closed = tok.chat(messages + [{"role": "assistant", "content": "Yes"}], add_generation_prompt=False)
    assert tok.decode(closed) == "user\nIs it red? \nassistant\nYes"


def test_save_load_round_trip_gives_identical_ids(folder, tmp_path):
    tok = load_tokenizer(folder)
    path = tok.save(tmp_path / "again")
    back = HFTokenizer.load(path.rsplit("/", 1)[0])
    text = f"the blue square {IMG_START}{IMAGE}{IMG_END} Yes."
    assert back.encode(text) == tok.encode(text)
    assert back.chat([{"role": "user", "content": text}]) == tok.chat([{"role": "user", "content": text}])
    specials = ["pad_id", "unk_id", "bos_id", "eos_id", "img_start_id", "img_end_id", "image_id", "vocab_size"]
    assert [getattr(back, s) for s in specials] == [getattr(tok, s) for s in specials]


def test_missing_image_token_is_refused_until_added(tmp_path):
    hf = _lm_tokenizer()
    with pytest.raises(ValueError, match="lacks image token '<img>'"):
        HFTokenizer(hf)
    hf.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain.*lacks image token '<img>'.*add_image_tokens"):
        load_tokenizer(tmp_path / "plain")
    n = len(hf)
    assert add_image_tokens(hf) == 3 and len(hf) == n + 3
    assert add_image_tokens(hf) == 0  # idempotent
    tok = HFTokenizer(hf)
    assert {tok.img_start_id, tok.img_end_id, tok.image_id} == {n, n + 1, n + 2}
    assert "<|im_start|>" in hf.all_special_tokens  # the LM's own specials stay registered


def test_custom_image_token_names(tmp_path):
    hf = _lm_tokenizer()
    add_image_tokens(hf, ["<image_start>", "<image_end>", "<image_pad>"])
    with pytest.raises(ValueError, match="lacks image token"):
        HFTokenizer(hf)
    tok = HFTokenizer(hf, img_start="<image_start>", img_end="<image_end>", image="<image_pad>")
    assert tok.encode("<image_pad>") == [tok.image_id]


def test_unknown_words_with_an_unk_token():
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", eos_token="[SEP]")
    add_image_tokens(hf)
    tok = HFTokenizer(hf)
    assert tok.unk_id == hf.unk_token_id and tok.pad_id == tok.eos_id and tok.bos_id is None
    assert tok.unknown_words("the red zebra Ωmega zebra") == ["zebra", "Ωmega"]
    assert tok.token_to_id("[UNK]") == tok.unk_id and tok.token_to_id("zebra") is None
    assert "[UNK]" in tok.decode(tok.encode("a zebra"))  # <unk> stays visible


def test_load_tokenizer_keeps_text_tokenizer_folders(tmp_path):
    build_tokenizer(["a", "red", "circle"]).save(tmp_path / "text")
    assert isinstance(load_tokenizer(tmp_path / "text"), TextTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")


def test_a_user_turn_is_wrapped_in_the_chat_template_and_packed_so(folder):
    """Understanding rows read the user's turn in the model's chat format (at inference, ``user_turn``; in
    training, packing); a text-to-image row is the raw caption, as LatentUM trains and samples it."""
    import numpy as np

    from latentum.data.packing import pack
    from latentum.data.sample import Sample

    tok = load_tokenizer(folder)
    image = np.zeros((16, 16, 3), np.uint8)
    turn = tok.user_turn([image, "Is it red?"])
    assert turn[0] == "<|im_start|>user\n" and turn[1] is image and turn[2:4] == ["\n", "Is it red?"]
    assert turn[4] == "<|im_end|>\n<|im_start|>assistant\n"
    qa = Sample(user=[image, "Is it red?"], assistant=["Yes"], task="qa")
    t2i = Sample(user=["a red circle"], assistant=[image], task="t2i")
    p = pack([qa, t2i], tok, canvas_grid=2)
    start = tok.token_to_id("<|im_start|>")
    assert (p.ids[0] == start).sum() == 2 and (p.ids[1] == start).sum() == 0
