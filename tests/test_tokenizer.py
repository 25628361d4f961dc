import numpy as np
import pytest
from tokenizers import Tokenizer, models

from latentum.data.tokenizer import SPECIALS, TextTokenizer, build_tokenizer
from latentum.worlds import shapes

WORDS = ["a", "red", "circle", "left", "of", "blue", "square", "?", "Is", "the", "Yes", "No", "2"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return build_tokenizer(WORDS)


def _texts(n: int = 200) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        s = shapes.qa_sample(rng, 64)
        out += [x for x in s.user + s.assistant if isinstance(x, str)]
        out.append(shapes.sample_prompt(rng).text)
    return out


def test_specials_have_fixed_ids(tok):
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(7))
    got = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.img_start_id, tok.img_end_id, tok.image_id]
    assert got == list(range(7))
    assert tok.vocab_size == len(SPECIALS) + len(set(WORDS))
    # specials written in a text are matched whole, not split at their punctuation
    assert tok.encode("<img> <image> </img>") == [tok.img_start_id, tok.image_id, tok.img_end_id]


def test_build_is_deterministic_and_sorted():
    a = build_tokenizer(WORDS)
    b = build_tokenizer(list(reversed(WORDS)) + WORDS[:3])  # order and duplicates do not matter
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    words = [a.id_to_token(i) for i in range(len(SPECIALS), a.vocab_size)]
    assert words == sorted(words)


def test_round_trip_on_world_texts():
    texts = _texts()
    tok = build_tokenizer(shapes.vocabulary())
    for t in texts:
        ids = tok.encode(t)
        assert tok.unk_id not in ids, t
        assert tok.decode(ids) == " ".join(t.split())


def test_punctuation_is_separated_and_normalize_compares_answers(tok):
    assert tok.encode("Is the circle?") == tok.encode("Is the circle ?")
    assert tok.normalize("  Is   the circle?") == "Is the circle ?"
    built = build_tokenizer(["Is it a hole?"])  # whole texts are split like encode splits them
    assert built.token_to_id("hole") is not None and built.token_to_id("?") is not None
    assert built.token_to_id("hole?") is None


def test_unknown_words_map_to_unk(tok):
    ids = tok.encode("a zebra circle")
    assert ids == [tok.token_to_id("a"), tok.unk_id, tok.token_to_id("circle")]
    assert tok.decode(ids) == "a <unk> circle"  # <unk> stays visible, unlike the other specials
    assert tok.normalize("zebra") != tok.normalize("")


def test_decode_skips_specials_unless_asked(tok):
    ids = [tok.bos_id, *tok.encode("Yes"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "Yes"
    assert tok.decode(ids, skip_special=False) == "<bos> Yes <eos> <pad>"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("bad", [None, b"a red", ["a"], 3])
def test_encode_rejects_non_str(tok, bad):
    with pytest.raises(TypeError, match="text"):
        tok.encode(bad)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tk")
    loaded = TextTokenizer.load(tmp_path / "tk")
    assert loaded.vocab_size == tok.vocab_size
    for t in ["a red circle left of the blue square ?", "zebra <img> Yes", ""]:
        assert loaded.encode(t) == tok.encode(t)
        assert loaded.decode(loaded.encode(t)) == tok.decode(tok.encode(t))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.load(tmp_path / "missing")


def test_rejects_tokenizer_with_wrong_special_ids():
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="<pad>"):
        TextTokenizer(raw)
