from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentum.data.sample import Sample
from latentum.worlds import shapes as S
from latentum.worlds.shapes.tasks import _apart


def _down(img: np.ndarray, side: int = 64) -> np.ndarray:
    """The 64 px version the pixel decoder renders at: a blended (bilinear) downsample."""
    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))


def _cases(n_per_category: int, seed: int):
    rng = np.random.default_rng(seed)
    for cat in S.CATEGORIES:
        for _ in range(n_per_category):
            spec = S.sample_prompt(rng, cat)
            yield spec, S.scene_for(spec, rng), rng


def test_oracle_accepts_clean_renders_at_128_and_64():
    ok = Counter()
    n = 0
    for spec, scene, _ in _cases(180, seed=0):  # 1080 scenes over the six categories
        assert S.satisfies(scene, spec), spec.text
        img = S.render(scene, 128)
        ok[128] += S.oracle(img, spec)
        ok["64 down"] += S.oracle(_down(img), spec)
        n += 1
    assert n >= 1000
    assert all(v / n >= 0.995 for v in ok.values()), (dict(ok), n)


def test_oracle_accepts_direct_64px_renders():
    cases = list(_cases(40, seed=1))
    assert sum(S.oracle(S.render(scene, 64), spec) for spec, scene, _ in cases) / len(cases) >= 0.995


def test_oracle_rejects_corrupted_prompts():
    n = rejected = 0
    for spec, scene, rng in _cases(60, seed=2):
        bad = S.corrupt(spec, rng)
        assert bad.text != spec.text and not S.satisfies(scene, bad), (spec.text, bad.text)
        rejected += not S.oracle(_down(S.render(scene, 128)), bad)
        n += 1
    assert rejected / n >= 0.99


def test_oracle_agrees_with_scene_truth_on_other_prompts():
    rng = np.random.default_rng(3)
    n, agree, accepted = 400, 0, 0
    for _ in range(n):
        asked, made = S.sample_prompt(rng), S.sample_prompt(rng)
        scene = S.scene_for(made, rng)
        truth = S.satisfies(scene, asked)
        agree += S.oracle(S.render(scene, 96), asked) == truth
        accepted += truth
    assert agree / n >= 0.995
    assert accepted / n < 0.3  # a scene made for another prompt is mostly rejected


def test_oracle_report_names_the_failure():
    spec = S.PromptSpec("counting", (S.Requirement("circle", count=3),))
    scene = S.scene_for(S.PromptSpec("counting", (S.Requirement("circle", count=2),)), 0)
    report = S.oracle_report(S.render(scene), spec)
    assert not report.correct and "exactly 3 circles, found 2" in report.reason and report.score == 0.0
    spec = S.PromptSpec("position", (S.Requirement("circle", 1, "red"), S.Requirement("square", 1, "blue")),
                        "left of")
    report = S.oracle_report(S.render(S.scene_for(S.corrupt(spec, 0), 0)), spec)
    assert not report.correct and "not left of" in report.reason and report.score == pytest.approx(2 / 3)


def test_parse_recovers_scene_objects():
    rng = np.random.default_rng(4)
    for _ in range(150):
        scene = S.scene_for(S.sample_prompt(rng), rng)
        for canvas, img in ((128, S.render(scene, 128)), (64, _down(S.render(scene, 128)))):
            got = S.parse(img)
            truth = S.scene_detections(scene, canvas)
            assert Counter((d.shape, d.color) for d in got) == Counter((d.shape, d.color) for d in truth)
            for t in truth:  # every object is found where the scene put it (pixel rounding aside)
                err = min(np.hypot(g.center[0] - t.center[0], g.center[1] - t.center[1]) for g in got)
                assert err <= 1.5


def test_relations_follow_geneval_rule():
    box = lambda x, y, s=10: S.Detected("circle", "red", (x - s / 2, y - s / 2, x + s / 2, y + s / 2), s * s)
    b = box(50, 50)
    assert S.relations(box(20, 50), b) == {"left of"}
    assert S.relations(box(50, 90), b) == {"below"}
    assert S.relations(box(52, 51), b) == set()  # offset inside the 0.1 * (dim_a + dim_b) margin
    assert S.relations(box(20, 20), b) == {"left of", "above"}  # 45 degrees lies in both cones
    assert S.relations(box(50 - 40, 50 - 40 * np.tan(np.radians(65))), b) == {"above"}  # outside 60 degrees
    rng = np.random.default_rng(5)
    for _ in range(200):  # antisymmetry: a rel b <=> b opposite(rel) a
        a, c = box(*rng.uniform(0, 128, 2)), box(*rng.uniform(0, 128, 2))
        assert {S.OPPOSITE[r] for r in S.relations(a, c)} == S.relations(c, a)


def test_scenes_are_inside_and_apart():
    for spec, scene, _ in _cases(30, seed=6):
        assert len(scene.objects) == sum(r.count for r in spec.requirements)
        for i, o in enumerate(scene.objects):
            assert 0 <= min(o.box) and max(o.box) <= 1
            assert S.MIN_SIZE <= o.size <= S.MAX_SIZE
            assert all(_apart(o, p) for p in scene.objects[i + 1:])


def test_prompt_texts():
    rng = np.random.default_rng(7)
    for cat in S.CATEGORIES:
        for _ in range(30):
            spec = S.sample_prompt(rng, cat)
            assert spec.category == cat and spec.text.split()[0] in {"a", "an", "two", "three", "four"}
            if cat == "position":
                assert f" {spec.relation} " in spec.text
            if cat in ("two_objects", "color_attr", "position"):
                assert spec.requirements[0].shape != spec.requirements[1].shape
            if cat == "color_attr":
                assert spec.requirements[0].color != spec.requirements[1].color
    assert S.Requirement("circle", 1, "orange").phrase == "an orange circle"
    assert S.Requirement("triangle", 3).phrase == "three triangles"
    with pytest.raises(ValueError, match="category"):
        S.sample_prompt(rng, "counting_sheep")


def test_samples_are_seeded_and_well_formed():
    for fn, task in ((S.t2i_sample, "shapes_t2i"), (S.qa_sample, "shapes_qa")):
        a, b = fn(np.random.default_rng(8), 64), fn(np.random.default_rng(8), 64)
        assert isinstance(a, Sample) and a.task == task
        assert [x if isinstance(x, str) else x.tobytes() for x in a.user + a.assistant] == \
               [x if isinstance(x, str) else x.tobytes() for x in b.user + b.assistant]
        assert all(img.shape == (64, 64, 3) for img in a.images)
    t2i = S.t2i_sample(np.random.default_rng(9))
    assert t2i.user == [t2i.meta["spec"].text] and S.oracle(t2i.assistant[0], t2i.meta["spec"])
    texts = {S.t2i_sample(np.random.default_rng(s)).user[0] for s in range(20)}
    assert len(texts) > 10


def test_qa_answers_correct_by_construction():
    rng = np.random.default_rng(10)
    answers = {q: Counter() for q in S.QA_TYPES}
    for _ in range(500):
        s = S.qa_sample(rng, 128)
        q, image, question, answer = s.meta["question_type"], s.user[0], s.user[1], s.assistant[0]
        answers[q][answer] += 1
        found = S.parse(image)  # check against the pixels, independently of how the scene was built
        if q == "count":
            shape = next(k for k, v in S.PLURALS.items() if v == question.split()[2])
            assert answer == S.NUMBERS[sum(d.shape == shape for d in found)]
        elif q == "color":
            shape = question.split()[-2]
            assert [answer] == [d.color for d in found if d.shape == shape]
        else:
            assert s.meta["spec"].text.split()[-1] in question
            assert (answer == "Yes") == S.oracle(image, s.meta["spec"])
    for q in ("relation", "match"):
        assert set(answers[q]) == {"Yes", "No"}
        assert 0.4 <= answers[q]["Yes"] / sum(answers[q].values()) <= 0.6, answers[q]
    assert len(answers["count"]) >= 4 and len(answers["color"]) == len(S.COLORS)


def test_vocabulary_covers_every_text():
    vocab = S.vocabulary()
    rng = np.random.default_rng(11)
    for _ in range(300):
        for s in (S.t2i_sample(rng, 64), S.qa_sample(rng, 64)):
            for text in (x for x in s.user + s.assistant if isinstance(x, str)):
                assert set(text.split()) <= vocab, text


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 64"):
        S.parse(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="image"):
        S.parse(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="canvas"):
        S.render(S.Scene(), canvas=16)
    with pytest.raises(ValueError, match="color"):
        S.Obj("circle", "pink", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match="relation"):
        S.PromptSpec("position", (S.Requirement("circle"),), "left of")
    with pytest.raises(TypeError, match="rng"):
        S.sample_prompt("seed")
    assert S.parse(S.render(S.Scene())) == []
    noise = np.random.default_rng(12).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert all(d.shape == "other" for d in S.parse(noise))


def test_describe_names_every_object_the_pixels_show_in_reading_order():
    rng = np.random.default_rng(12)
    sizes, checked = Counter(), 0
    for _ in range(200):
        s = S.describe_sample(rng, 128)
        image, question, answer = s.user[0], s.user[1], s.assistant[0]
        assert s.task == "shapes_describe" and question == "Write the image as text ."
        found = S.parse(image)  # the pixels, independently of the scene the text was written from
        sizes[len(found)] += 1
        if any(min(v % 16, 16 - v % 16) < 1.5 for d in found for v in d.center):
            continue  # a centre within a pixel's rounding of a cell's edge: its cell is the scene's, not the pixels'
        checked += 1

        def cell(d):
            x, y = d.center
            return int(y * 8 / 128), int(x * 8 / 128), x

        expected = [f"a {d.color} {d.shape} at row {r + 1} column {c + 1}"
                    for (r, c, _), d in sorted(((cell(d), d) for d in found), key=lambda t: t[0])]
        assert answer.split(" , ") == expected
    assert set(sizes) == {1, 2, 3, 4, 5} and checked > 60
    assert set(S.describe_text(S.Scene()).split()) == set()
    samples = [S.describe_sample(np.random.default_rng(k)) for k in range(50)]
    words = {w for s in samples for w in s.assistant[0].split()}
    assert words <= S.vocabulary()


def test_worked_out_qa_describes_the_scene_then_gives_the_same_answer():
    from latentum.data.sample import final_answer
    for qtype in S.QA_TYPES:
        for k in range(25):
            plain = S.qa_sample(np.random.default_rng([k, 7]), 128, qtype)
            s = S.qa_steps_sample(np.random.default_rng([k, 7]), 128, qtype)
            assert s.task == "shapes_qa_steps" and s.user[1] == plain.user[1]
            np.testing.assert_array_equal(s.user[0], plain.user[0])
            steps, answer = s.assistant[0].rsplit(" , ", 1)
            assert steps == S.describe_text(s.meta["scene"]) and answer == plain.assistant[0]
            assert final_answer(s.assistant[0]) == s.meta["answer"] == plain.meta["answer"]
            assert set(s.assistant[0].split()) <= S.vocabulary()


def test_checked_qa_writes_the_checks_its_answer_rests_on():
    from latentum.data.sample import final_answer
    for qtype in S.QA_TYPES:
        for k in range(40):
            plain = S.qa_sample(np.random.default_rng([k, 9]), 128, qtype)
            steps = S.qa_steps_sample(np.random.default_rng([k, 9]), 128, qtype)
            s = S.qa_checks_sample(np.random.default_rng([k, 9]), 128, qtype)
            assert s.task == "shapes_qa_checks" and s.user[1] == plain.user[1]
            assert final_answer(s.assistant[0]) == plain.assistant[0]
            assert set(s.assistant[0].split()) <= S.vocabulary()
            if qtype in ("count", "color"):
                assert s.assistant[0] == steps.assistant[0]
                continue
            scene, spec = s.meta["scene"], s.meta["spec"]
            description, checks = S.describe_text(scene), S.checks_text(scene, spec)
            assert s.assistant[0] == f"{description} , {checks} , {plain.assistant[0]}"
            checks = checks.split(" , ")
            counts = [S.NUMBERS.index(c.split()[0]) for c in checks[:len(spec.requirements)]]
            enough = all(n == r.count if spec.exact else n >= r.count for n, r in zip(counts, spec.requirements))
            if plain.assistant[0] == "Yes":
                assert enough, (s.user[1], s.assistant[0])
            elif spec.relation is None:
                assert not enough, (s.user[1], s.assistant[0])  # a No without a relation: a count falls short
            for place in checks[len(spec.requirements):]:  # the related objects' cells, copied from the description
                assert place.startswith("the ") and f"a {place[4:]}" in description.split(" , ")
            assert len(checks) == len(spec.requirements) + (2 if spec.relation and all(counts) else 0)


def test_reasoned_text_to_image_plans_exactly_the_objects_it_then_draws():
    for k in range(60):
        plain = S.t2i_sample(np.random.default_rng([k, 11]), 128)
        s = S.t2i_reason_sample(np.random.default_rng([k, 11]), 128)
        assert s.task == "shapes_t2i_reason" and s.user == plain.user and not s.is_text_to_image
        plan, image = s.assistant
        np.testing.assert_array_equal(image, plain.assistant[0])
        assert plan == S.describe_text(s.meta["scene"]) and set(plan.split()) <= S.vocabulary()
        spec = s.meta["spec"]
        planned = [p.split(" at ")[0].split()[1:] for p in plan.split(" , ")]  # [colour, shape] per object
        assert len(planned) == sum(r.count for r in spec.requirements)
        for r in spec.requirements:
            assert sum(shape == r.shape and r.color in (None, colour) for colour, shape in planned) == r.count
