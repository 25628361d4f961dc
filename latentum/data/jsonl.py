"""User data: the interleaved JSONL format of the LatentUM reference (reference/latentum-paper-and-code.md
§7).

One JSON object per line::

    {"id": "level6-021",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "images/0.png"},
                                                {"type": "text", "text": "Plan a path."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "R"}, ...]}]}

Image paths are relative to the JSONL file's folder, or absolute. Every problem is reported as
``file:line: problem`` so a user can fix the data without reading our code. The reference trainer also
demands exactly one user image and an assistant turn ending in text; that holds for planning data but not for
text-to-image samples (user text, assistant image), so it is only checked with ``strict=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentum.data.sample import Item, Sample

ROLES = ("user", "assistant")
ImageTransform = Callable[[np.ndarray], np.ndarray]


def _load_image(path: Path) -> tuple[np.ndarray | None, str | None]:
    if not path.is_file():
        return None, f"image file not found: {str(path)!r}"
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), None
    except Exception as e:  # PIL raises several types for corrupt or non-image files
        return None, f"unreadable image {str(path)!r} ({type(e).__name__}: {e})"


def _parse_item(item: Any, where: str, base: Path) -> tuple[Item | None, str | None]:
    """One content item -> (text or RGB array, None) or (None, problem)."""
    if not isinstance(item, dict):
        return None, f"{where} must be an object, got {type(item).__name__}"
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            return None, f"{where}: missing key 'text' (a string)" if text is None else \
                f"{where}: 'text' must be a string, got {type(text).__name__}"
        return (text, None) if text.strip() else (None, f"{where}: empty text")
    if kind == "image":
        ref = item.get("image")
        if not isinstance(ref, str) or not ref:
            return None, f"{where}: 'image' must be a non-empty path string, got {ref!r}"
        return _load_image(base / ref)
    if kind is None:
        return None, f"{where}: missing key 'type'"
    return None, f"{where}: unknown content type {kind!r} (expected 'text' or 'image')"


def _parse_message(msg: Any, i: int, base: Path) -> tuple[list[Item], list[str]]:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        return [], [f"{where} must be an object, got {type(msg).__name__}"]
    content = msg.get("content")
    if not isinstance(content, list) or not content:
        return [], [f"{where}: 'content' must be a non-empty list, got {content!r:.60}"]
    items, problems = [], []
    for j, raw in enumerate(content):
        item, problem = _parse_item(raw, f"{where}.content[{j}]", base)
        if problem:
            problems.append(problem)
        else:
            items.append(item)
    return items, problems


def _strict_problems(user: list[Item], assistant: list[Item]) -> list[str]:
    problems = []
    n_images = sum(isinstance(x, np.ndarray) for x in user)
    if n_images != 1:
        problems.append(f"strict: the user turn must hold exactly one image, got {n_images}")
    if assistant and not isinstance(assistant[-1], str):
        problems.append("strict: the assistant turn must end with text")
    return problems


def _parse_record(obj: Any, base: Path, strict: bool) -> tuple[tuple[str, list, list] | None, list[str]]:
    """A decoded line -> ((id, user items, assistant items), []) or (None, problems)."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing key {k!r}" for k in ("id", "messages") if k not in obj]
    if problems:
        return None, problems
    if not isinstance(obj["id"], str) or not obj["id"]:
        problems.append(f"'id' must be a non-empty string, got {obj['id']!r}")
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        return None, problems + [f"'messages' must be a list, got {type(msgs).__name__}"]
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    if roles != list(ROLES):
        return None, problems + [f"'messages' must be exactly [user, assistant] in that order, "
                                 f"got roles {roles}"]
    (user, p_user), (assistant, p_asst) = (_parse_message(m, i, base) for i, m in enumerate(msgs))
    problems += p_user + p_asst
    if strict and not problems:
        problems += _strict_problems(user, assistant)
    return (None, problems) if problems else ((obj["id"], user, assistant), [])


def _records(path: str | os.PathLike, strict: bool) -> Iterator[tuple[int, tuple | None, list[str]]]:
    """(line number, parsed record or None, problems) for every non-blank line."""
    path = Path(path)
    base = path.resolve().parent
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, [f"invalid JSON ({e.msg} at column {e.colno})"]
                continue
            record, problems = _parse_record(obj, base, strict)
            if record is not None and record[0] in seen:
                record, problems = None, [f"duplicate id {record[0]!r} (first on line {seen[record[0]]})"]
            if record is not None:
                seen[record[0]] = lineno
            yield lineno, record, problems


def _transform(image: np.ndarray, image_transform: ImageTransform | None) -> np.ndarray:
    if image_transform is None:
        return image
    out = image_transform(image)
    if isinstance(out, Image.Image):
        out = np.asarray(out.convert("RGB"), dtype=np.uint8)
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3):
        raise TypeError(f"image_transform must return a uint8 (H, W, 3) array, got {type(out).__name__} "
                        f"{getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}")
    return out


def iter_jsonl(path: str | os.PathLike, task: str = "jsonl", image_transform: ImageTransform | None = None,
               strict: bool = False) -> Iterator[Sample]:
    """Samples of a JSONL file, one per line, lazily; raises ValueError at the first bad line.

    Images are uint8 RGB arrays, passed through ``image_transform`` (e.g. a resize to the canvas) when given.
    ``meta`` holds the record's id, the file and the line number.
    """
    for lineno, record, problems in _records(path, strict):
        if problems:
            raise ValueError(f"{path}:{lineno}: " + "; ".join(problems))
        rid, user, assistant = record
        user, assistant = ([_transform(x, image_transform) if isinstance(x, np.ndarray) else x for x in turn]
                           for turn in (user, assistant))
        yield Sample(user, assistant, task, {"id": rid, "path": str(path), "line": lineno})


def read_jsonl(path: str | os.PathLike, task: str = "jsonl", image_transform: ImageTransform | None = None,
               strict: bool = False) -> list[Sample]:
    """All samples of a JSONL file (see ``iter_jsonl``)."""
    return list(iter_jsonl(path, task, image_transform, strict))


def validate_jsonl(path: str | os.PathLike, strict: bool = False) -> list[str]:
    """Every problem in the file as ``file:line: problem`` (empty when the file is valid); never raises on bad
    content, so a user sees all errors at once."""
    return [f"{path}:{lineno}: {p}" for lineno, _, problems in _records(path, strict) for p in problems]


def _content(items: list[Item], where: str, folder: Path, image_dir: str, prefix: str) -> list[dict]:
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"{where}[{k}]: empty text cannot be written (read_jsonl would reject it)")
            out.append({"type": "text", "text": item})
            continue
        rel = f"{prefix}-{sum(isinstance(x, np.ndarray) for x in items[:k])}.png"
        rel = Path(image_dir, rel).as_posix()
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item).save(folder / rel)
        out.append({"type": "image", "image": rel})
    if not out:
        raise ValueError(f"{where}: an empty turn cannot be written (read_jsonl would reject it)")
    return out


def _ids(samples: list[Sample], ids: Iterable[str] | None, stem: str) -> list[str]:
    if ids is None:
        ids = [str(s.meta.get("id") or f"{stem}-{i:06d}") for i, s in enumerate(samples)]
    ids = list(ids)
    if len(ids) != len(samples):
        raise ValueError(f"ids must have one entry per sample: got {len(ids)} ids for {len(samples)} samples")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise ValueError(f"ids must be non-empty strings, got {bad[:3]}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique (read_jsonl rejects duplicate ids)")
    return ids


def write_jsonl(path: str | os.PathLike, samples: Iterable[Sample], image_dir: str = "images",
                ids: Iterable[str] | None = None) -> Path:
    """Write samples as JSONL, saving each image as a PNG under ``image_dir`` (relative to the file's folder)
    and storing that relative path, so ``read_jsonl`` gives the same texts and pixels back.

    Ids default to each sample's ``meta["id"]``, else ``<stem>-<index>``. Image names are prefixed with the
    file's stem so two files may share ``image_dir``. The task name is not stored (``read_jsonl`` takes it).
    """
    path = Path(path)
    samples = list(samples)
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"samples[{i}] must be a Sample, got {type(s).__name__}")
    if Path(image_dir).is_absolute():
        raise ValueError(f"image_dir must be relative to the JSONL's folder, got {image_dir!r}")
    ids = _ids(samples, ids, path.stem)
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (s, rid) in enumerate(zip(samples, ids)):
        turns = [_content(getattr(s, role), f"samples[{i}].{role}", folder, image_dir,
                          f"{path.stem}-{i:06d}-{role}") for role in ROLES]
        record = {"id": rid, "messages": [{"role": r, "content": c} for r, c in zip(ROLES, turns)]}
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
