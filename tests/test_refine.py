"""Reason, reflect, refine and best-of-k (issue #28): the world's flaw injection, the batched prefill of latent
images the refine turn needs, and the loops' invariants on a tiny random model (the quality of a trained model's
reflections is measured by ``latentum eval shapes``)."""

import copy

import numpy as np
import pytest
import torch

from latentum.api import LatentImage, LatentUM
from latentum.data.refine import NO_EDIT, refine_items, reflect_question
from latentum.generation import refine as r3
from latentum.generation.engine import Decoder
from latentum.model.latentum import LatentUMModel
from latentum.train.config import load_recipe
from latentum.worlds import shapes as S
from latentum.worlds.registry import TASKS, default_tokenizer, make_sample

TOK = default_tokenizer()


@pytest.fixture(scope="module")
def api():
    torch.manual_seed(0)
    cfg = copy.deepcopy(load_recipe("configs/recipes/debug.yaml").model)
    cfg.backbone.vocab_size = TOK.vocab_size
    m = LatentUMModel(cfg).eval()
    with torch.no_grad():
        for p in m.backbone.branch_parameters("gen"):
            p.add_(0.05 * torch.randn_like(p))
    return LatentUM(m, TOK)


# ------------------------------------------------------------------------------------------------ the world


def test_an_injected_flaw_breaks_the_prompt_and_its_instruction_names_the_fix():
    rng = np.random.default_rng(0)
    kinds = set()
    for category in S.CATEGORIES:
        for _ in range(40):
            spec = S.sample_prompt(rng, category)
            scene = S.scene_for(spec, rng)
            flawed, instruction = S.inject_flaw(scene, spec, rng)
            assert S.satisfies(scene, spec) and not S.satisfies(flawed, spec)
            assert not S.oracle(S.render(flawed, 128), spec)  # the pixel oracle agrees with the geometry
            assert instruction != NO_EDIT and not TOK.unknown_words(instruction)
            kinds.add(instruction.split()[0])
    assert kinds == {"make", "replace", "add", "remove", "move"}


def test_a_scene_that_already_fails_is_refused():
    spec = S.sample_prompt(np.random.default_rng(1), "colors")
    with pytest.raises(ValueError, match="must show the prompt"):
        S.inject_flaw(S.Scene(()), spec, 0)


def test_reflect_and_refine_samples():
    rng = np.random.default_rng(4)
    reflections = [S.reflect_sample(rng) for _ in range(200)]
    no_edit = [s for s in reflections if s.assistant == [NO_EDIT]]
    assert 70 < len(no_edit) < 130  # about half show their prompt
    for s in reflections:
        spec = s.meta["spec"]
        assert s.user[1] == reflect_question(spec.text)
        assert S.satisfies(s.meta["scene"], spec) == (s.assistant == [NO_EDIT])
    s = S.refine_sample(rng)
    spec = s.meta["spec"]
    assert s.user[0] == spec.text and isinstance(s.user[2], str)
    assert not S.satisfies(s.meta["flawed"], spec) and S.satisfies(s.meta["scene"], spec)
    assert np.array_equal(s.assistant[0], S.render(s.meta["scene"], 128))
    assert np.array_equal(np.asarray(s.user[1]), S.render(s.meta["flawed"], 128))


def test_every_new_task_is_registered_and_in_the_vocabulary():
    rng = np.random.default_rng(5)
    for task in ("shapes_t2i_photo", "shapes_reflect", "shapes_refine"):
        assert task in TASKS
        for _ in range(30):
            s = make_sample(task, rng)
            for x in s.user + s.assistant:
                assert not isinstance(x, str) or not TOK.unknown_words(x), x
    assert make_sample("shapes_t2i_photo", np.random.default_rng(6)).user[0].startswith("a photo of ")


# ------------------------------------------------------------------------------------------------ the engine


def test_latent_images_prefill_in_a_batch_as_they_feed_one_by_one(api):
    """The refine turn's batched prefill (left-padded rows holding LatentImages) equals feeding each row's items
    one at a time."""
    g = api.config.encoder.grid
    gen = torch.Generator().manual_seed(0)
    K, G = api.config.quantizer.codebook_size, api.config.quantizer.codebooks
    latents = [LatentImage(torch.randint(0, K, (g * g, G), generator=gen)) for _ in range(2)]
    rows = [refine_items("a red circle", latents[0], "make the circle red"),
            refine_items("two squares and a blue triangle", latents[1], "add one square")]
    batch = Decoder(api.model, TOK, 2, 512)
    batch.prefill(rows)
    for b, row in enumerate(rows):
        one = Decoder(api.model, TOK, 1, 512)
        one.feed_ids(torch.tensor([[TOK.bos_id]]))
        for item in row:
            if isinstance(item, str):
                one.feed_prompt_ids(torch.tensor([TOK.encode(item)]))
            else:
                one.feed_latents(item.ids[None])
        torch.testing.assert_close(batch.text_logits()[b], one.text_logits()[0], atol=1e-4, rtol=1e-4)


def test_refine_stops_rows_that_say_no_edit_and_keeps_every_round(api, monkeypatch):
    prompts = ["a red circle", "three squares", "a blue triangle"]
    said = {"a red circle": NO_EDIT, "three squares": "add one square", "a blue triangle": "make the triangle blue"}
    monkeypatch.setattr(r3, "reflect", lambda model, tok, ids, rows, **k: [said[p] for p in rows])
    out = api.refine(prompts, rounds=2, seed=0)
    assert [len(j.images) for j in out] == [1, 3, 3]
    assert out[0].reflections == [NO_EDIT] and out[1].reflections == ["add one square"] * 3
    for j in out:
        assert j.best == int(np.argmax(j.scores)) and j.image is j.images[j.best]
        # the scores are the model's own judgement of each kept image
        ids = torch.stack([x.ids for x in j.images])
        np.testing.assert_allclose(r3.judge(api.model, TOK, ids, [j.prompt] * len(j.images)), j.scores, atol=1e-4)
        assert j.scores[j.best] >= j.scores[0]  # never an image it judges worse than its first
    again = api.refine(prompts, rounds=2, seed=0)
    assert all(torch.equal(a.image.ids, b.image.ids) for a, b in zip(out, again))  # seeded


def test_refine_edits_from_the_previous_image_and_the_instruction(api, monkeypatch):
    seen = []
    edit = r3.edit_latents
    monkeypatch.setattr(r3, "reflect", lambda model, tok, ids, rows, **k: ["add one square"] * len(rows))
    monkeypatch.setattr(r3, "edit_latents", lambda m, t, p, prev, ins, *a: (seen.append((p, prev.clone(), ins)),
                                                                           edit(m, t, p, prev, ins, *a))[1])
    out = api.refine("three squares", rounds=1, seed=3)
    assert len(seen) == 1 and seen[0][0] == ["three squares"] and seen[0][2] == ["add one square"]
    assert torch.equal(seen[0][1][0], out.images[0].ids)


def test_best_of_picks_the_image_the_model_judges_best(api):
    out = api.best_of(["a red circle", "two squares"], k=3, seed=1)
    for j in out:
        assert len(j.images) == 3 and j.reflections == []
        ids = torch.stack([x.ids for x in j.images])
        np.testing.assert_allclose(r3.judge(api.model, TOK, ids, [j.prompt] * 3), j.scores, atol=1e-4)
        assert j.scores[j.best] == max(j.scores)
    assert not all(torch.equal(out[0].images[0].ids, x.ids) for x in out[0].images[1:])  # k different samples


def test_refine_and_best_of_refuse_bad_input_and_untrained_vocabularies(api, untrained_model):
    with pytest.raises(ValueError, match="rounds"):
        api.refine("a red circle", rounds=-1)
    with pytest.raises(ValueError, match="k must"):
        api.best_of("a red circle", k=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        api.refine("a zebra")
    old = LatentUM.from_pretrained("checkpoints/tiny")  # trained before the protocol's words existed
    with pytest.raises(ValueError, match="not trained to reflect"):
        old.refine("a red circle")
