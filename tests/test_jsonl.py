import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentum.data.jsonl import iter_jsonl, read_jsonl, validate_jsonl, write_jsonl
from latentum.data.sample import Sample
from latentum.worlds import shapes


def _img(seed: int, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = [shapes.t2i_sample(rng, 64), shapes.qa_sample(rng, 64)]
    # a planning-style trajectory: one input image, assistant text interleaved with images, ending in text
    out.append(Sample([_img(1), "Plan a path ."], ["R", _img(2), "D", _img(3), "Done !"], "vsp_plan"))
    return out


def _items(s: Sample) -> list:
    key = lambda x: x if isinstance(x, str) else (x.shape, x.tobytes())
    return [[key(x) for x in s.user], [key(x) for x in s.assistant]]


def test_round_trip_is_exact(tmp_path):
    samples = _samples()
    path = write_jsonl(tmp_path / "data" / "train.jsonl", samples, ids=["a", "b", "c"])
    assert validate_jsonl(path) == []
    back = read_jsonl(path, task="mine")
    assert [_items(s) for s in back] == [_items(s) for s in samples]
    assert [s.meta["id"] for s in back] == ["a", "b", "c"] and {s.task for s in back} == {"mine"}
    assert [s.meta["line"] for s in back] == [1, 2, 3]
    # image paths are stored relative to the file's folder, inside image_dir
    for line in path.read_text().splitlines():
        for msg in json.loads(line)["messages"]:
            for item in msg["content"]:
                if item["type"] == "image":
                    assert not Path(item["image"]).is_absolute() and item["image"].startswith("images/")
                    assert (path.parent / item["image"]).is_file()


def test_two_files_share_an_image_dir(tmp_path):
    a, b = _samples()[2], Sample([_img(9)], ["x"], "t")
    write_jsonl(tmp_path / "a.jsonl", [a])
    write_jsonl(tmp_path / "b.jsonl", [b])
    assert _items(read_jsonl(tmp_path / "a.jsonl")[0]) == _items(a)
    assert _items(read_jsonl(tmp_path / "b.jsonl")[0]) == _items(b)


def test_image_transform_and_absolute_paths(tmp_path):
    Image.fromarray(_img(4, 32)).save(tmp_path / "abs.png")
    line = {"id": "x", "messages": [
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "abs.png")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    path = tmp_path / "sub" / "f.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(line) + "\n\n")  # a trailing blank line is fine
    (s,) = read_jsonl(path, image_transform=lambda im: im[::2, ::2])
    np.testing.assert_array_equal(s.user[0], _img(4, 32)[::2, ::2])
    with pytest.raises(TypeError, match="image_transform"):
        read_jsonl(path, image_transform=lambda im: im.astype(np.float32))
    assert next(iter_jsonl(path)).meta["id"] == "x"


def _line(user=None, assistant=None, **over) -> str:
    user = user or [{"type": "image", "image": "ok.png"}, {"type": "text", "text": "q"}]
    rec = {"id": "s", "messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant or [{"type": "text", "text": "a"}]}]}
    rec.update(over)
    return json.dumps(rec)


BAD = {
    "bad_json": ('{"id": "s", "messages": [', "invalid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object"),
    "missing_id": (json.dumps({"messages": []}), "missing key 'id'"),
    "missing_messages": (json.dumps({"id": "s"}), "missing key 'messages'"),
    "wrong_order": (_line(messages=[{"role": "assistant", "content": []}, {"role": "user", "content": []}]),
                    "exactly [user, assistant]"),
    "one_message": (_line(messages=[{"role": "user", "content": [{"type": "text", "text": "q"}]}]),
                    "exactly [user, assistant]"),
    "unknown_type": (_line(assistant=[{"type": "video", "video": "v.mp4"}]), "unknown content type 'video'"),
    "missing_type": (_line(assistant=[{"text": "a"}]), "missing key 'type'"),
    "empty_text": (_line(assistant=[{"type": "text", "text": "  "}]), "empty text"),
    "missing_image": (_line(user=[{"type": "image", "image": "nope.png"}]), "image file not found"),
    "unreadable_image": (_line(user=[{"type": "image", "image": "junk.png"}]), "unreadable image"),
    "item_not_object": (_line(user=[None]), "must be an object"),
    "empty_turn": (_line(messages=[{"role": "user", "content": []}, {"role": "assistant", "content": ["a"]}]),
                   "'content' must be a non-empty list"),
    "bad_id": (_line(id=""), "'id' must be a non-empty string"),
}


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.fromarray(_img(5)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    return tmp_path


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_error_names_file_line_and_problem(folder, name):
    bad, expected = BAD[name]
    path = folder / "f.jsonl"
    path.write_text(_line(id="good") + "\n" + bad + "\n")
    with pytest.raises(ValueError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and expected in msg, msg
    problems = validate_jsonl(path)
    assert problems and all(p.startswith(f"{path}:2: ") for p in problems) and expected in problems[0]


def test_duplicate_ids_and_strict_rules(folder):
    path = folder / "f.jsonl"
    path.write_text(_line() + "\n" + _line() + "\n")
    assert validate_jsonl(path) == [f"{path}:2: duplicate id 's' (first on line 1)"]
    t2i = _line(user=[{"type": "text", "text": "q"}], assistant=[{"type": "image", "image": "ok.png"}])
    path.write_text(t2i)
    assert validate_jsonl(path) == []  # text-to-image is valid by default
    problems = validate_jsonl(path, strict=True)
    assert any("exactly one image" in p for p in problems) and any("end with text" in p for p in problems)
    with pytest.raises(ValueError, match="strict"):
        read_jsonl(path, strict=True)


def test_validate_collects_every_problem(folder):
    path = folder / "f.jsonl"
    lines = [_line(id="g1")] + [BAD[k][0] for k in sorted(BAD)] + [_line(id="g2")]
    path.write_text("\n".join(lines) + "\n")
    problems = validate_jsonl(path)
    assert all(p.startswith(f"{path}:") for p in problems)
    assert {int(p[len(str(path)) + 1:].split(":")[0]) for p in problems} == set(range(2, len(BAD) + 2))


def test_write_rejects_what_read_would_reject(tmp_path):
    good = Sample(["q"], ["a"], "t")
    with pytest.raises(ValueError, match="unique"):
        write_jsonl(tmp_path / "f.jsonl", [good, good], ids=["x", "x"])
    with pytest.raises(ValueError, match="one entry per sample"):
        write_jsonl(tmp_path / "f.jsonl", [good], ids=["x", "y"])
    with pytest.raises(ValueError, match=r"samples\[0\].assistant\[0\]: empty text"):
        write_jsonl(tmp_path / "f.jsonl", [Sample(["q"], [""], "t")])
    with pytest.raises(ValueError, match=r"samples\[0\].user: an empty turn"):
        write_jsonl(tmp_path / "f.jsonl", [Sample([], ["a"], "t")])
    with pytest.raises(TypeError, match=r"samples\[0\]"):
        write_jsonl(tmp_path / "f.jsonl", [{"user": ["q"]}])
    with pytest.raises(ValueError, match="image_dir"):
        write_jsonl(tmp_path / "f.jsonl", [good], image_dir=str(tmp_path / "abs"))
