"""The public API on the model the debug recipe trains: well-formed results, clear errors, exact save/load."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentum import LatentImage, LatentUM
from latentum.apps.vsp import entry
from latentum.worlds import frozenlake as fl


@pytest.fixture(scope="module")
def api(debug_run):
    return LatentUM.from_pretrained(debug_run / "model")


@pytest.fixture(scope="module")
def lake():
    m = fl.generate_map(4, np.random.default_rng(0))
    return m, fl.render(m, style="classic")


def test_answer_accepts_array_pil_and_path(api, lake, tmp_path):
    _, image = lake
    path = tmp_path / "map.png"
    Image.fromarray(image).save(path)
    answers = [api.answer(x, "Is there a hole at row 1 column 1 ?") for x in (image, Image.fromarray(image), path)]
    assert all(isinstance(a, str) for a in answers)
    assert answers[0] == answers[1] == answers[2]  # greedy decoding of the same pixels
    single = api.answer(image, "Where is the player ?")
    assert api.answer_batch([image, image], ["Where is the player ?"] * 2) == [single] * 2


def _stepwise_logprob(api, image, question: str, option: str) -> float:
    """Feed the option one token at a time and add up each token's log-probability (the reference)."""
    from latentum.generation.interleaved import prefill_rows

    dec = prefill_rows(api.model, api.tokenizer, [[api._image_item(image, "image"), question]])
    total = 0.0
    for t in api.tokenizer.encode(option) + [api.tokenizer.eos_id]:
        total += float(dec.text_logits().log_softmax(-1)[0, t])
        dec.feed_ids(torch.tensor([[t]]))
    return total


def test_score_options_equals_token_by_token_scoring(api, lake):
    _, image = lake
    q = "Write the map as a text grid ."
    options = ["S F / F G", "Yes", "S F H F / F F F F / H F F F / F F F G", "row 1 column 2"]  # padded to the longest
    with torch.inference_mode():
        scores = api.score_options(image, q, options)
        reference = [_stepwise_logprob(api, image, q, o) for o in options]
    assert np.allclose(scores, reference, atol=1e-3), (scores, reference)
    assert api.choose(image, q, options) == options[int(np.argmax(reference))]
    assert api.score_options_batch([image, image], [q, "Where is the player ?"], [options, options[:2]])[0] == \
        pytest.approx(scores, abs=1e-3)
    latent = api.image_latent(image)  # a LatentImage prompt is scored one row at a time
    assert all(np.isfinite(api.score_options(latent, q, options[:2])))


@pytest.mark.parametrize("options, match", [("Yes", "options\\[0\\] must be a non-empty list"),
                                            ([], "options\\[0\\] must be"),
                                            (["Yes", ""], "options\\[0\\]\\[1\\] must be")])
def test_score_options_rejects_bad_options(api, lake, options, match):
    with pytest.raises(ValueError, match=match):
        api.score_options(lake[1], "Is there a hole at row 1 column 1 ?", options)


def test_generate_images_render_and_read_back(api):
    latents = api.generate_images(["a red circle", "two squares"], cfg_scale=3.0, seed=0)
    assert len(latents) == 2 and all(isinstance(x, LatentImage) for x in latents)
    assert latents[0].ids.shape == (64, api.config.quantizer.codebooks)
    assert int(latents[0].ids.max()) < api.config.quantizer.codebook_size
    again = api.generate_images(["a red circle", "two squares"], cfg_scale=3.0, seed=0)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(latents, again))  # seeded
    image = api.render(latents[0], seed=0)
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), np.asarray(api.render(latents[0], seed=0)))
    assert isinstance(api.answer(latents[0], "How many circles are there ?"), str)  # und branch, no pixels


def test_generate_and_plan(api, lake):
    m, image = lake
    out = api.generate(["Plan a safe path for the player to the goal .", image], max_images=2, max_new_tokens=6)
    assert isinstance(out, list) and all(isinstance(x, (str, LatentImage)) for x in out)
    plan = entry.plan(api, image, max_steps=4, seed=0)
    assert set(plan.actions) <= set("LDRU") and len(plan.actions) <= 4
    assert len(plan.thoughts) == len(plan.actions)
    assert all(t.ids.shape[0] == m.size**2 for t in plan.thoughts)


def test_save_load_round_trip_is_bit_identical(api, tmp_path):
    api.render(api.generate_images(["a circle"], seed=1)[0])  # loads the decoder so it is saved too
    api.save_pretrained(tmp_path / "copy")
    back = LatentUM.from_pretrained(tmp_path / "copy")
    a, b = api.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da, db = api.decoder.state_dict(), back.decoder.state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((0, 20, 3), np.uint8), ValueError, "uint8 \\(H, W, 3\\)"),
    (np.zeros((64, 64), np.uint8), ValueError, "uint8 \\(H, W, 3\\)"),
    (np.zeros((64, 64, 3), np.float32), ValueError, "uint8"),
    ("does/not/exist.png", ValueError, "no such file"),
    (42, TypeError, "PIL image"),
])
def test_bad_images_are_named(api, bad, err, match):
    with pytest.raises(err, match=match):
        api.answer(bad, "Where is the player ?")


def test_bad_arguments_are_named(api, lake, tmp_path):
    _, image = lake
    with pytest.raises(ValueError, match="question"):
        api.answer(image, "")
    with pytest.raises(ValueError, match="cfg_scale"):
        api.generate_images(["a circle"], cfg_scale=0.5)
    with pytest.raises(ValueError, match="prompts"):
        api.generate_images([])
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="batch must be an int >= 1"):
            api.generate(["a circle"], batch=bad)
    with pytest.raises(TypeError, match="seed"):
        entry.plan(api, image, seed="0")
    with pytest.raises(ValueError, match="max_steps"):
        entry.plan(api, image, max_steps=0)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        entry.plan(api, text)
    with pytest.raises(ValueError, match="not a latentum model folder"):
        LatentUM.from_pretrained(tmp_path)


def test_latent_fidelity_is_exact_match_with_the_encoded_true_board(api):
    from latentum.apps.vsp.evaluate import eval_maps, latent_match
    from latentum.data.canvas import active_index

    m = eval_maps(4, 1, seed=7)[0]
    pos, truth = m.player, []
    for a in fl.shortest_plan(m):
        pos = fl.move(m, pos, a)
        truth.append((m, pos, a))
    boards = np.stack([fl.render_canvas(m, p, "classic", a, canvas=api.canvas) for _, p, a in truth])
    ids = list(api.model.image_ids(boards)[:, list(active_index(4, api.config.encoder.grid))].cpu())
    assert latent_match(api, ids, truth, "classic") == 1.0
    ids[0] = ids[0].clone()
    ids[0][5, 0] = (ids[0][5, 0] + 1) % api.config.quantizer.codebook_size  # one wrong code, one wrong thought
    assert latent_match(api, ids, truth, "classic") == pytest.approx(1 - 1 / len(truth))


def test_oracle_thoughts_are_the_encoded_true_boards(api, monkeypatch, moves_first):
    """The oracle planner reads exactly the encoded simulated board after each of its own moves (and keeps
    them as its thoughts, so a move it takes back drops its board too)."""
    from latentum.apps.vsp.evaluate import eval_maps, oracle_plans
    from latentum.data.canvas import active_index
    from latentum.generation.engine import Decoder

    seen, feed = [], Decoder.feed_latents

    def spy(self, ids, rows=None):  # the boards of the rows that read one (the others said "Done" this step)
        seen.append(ids.clone() if rows is None else ids[rows.to(ids.device)].clone())
        return feed(self, ids, rows)

    monkeypatch.setattr(Decoder, "feed_latents", spy)
    maps = eval_maps(3, 3, seed=5)
    plans = oracle_plans(api, maps, "classic")
    assert all(len(p.thoughts) == len(p.actions) for p in plans) and sum(len(p.actions) for p in plans) > 0
    # the k-th read holds, for every row still planning (in row order), the true board after k + 1 moves
    index, expected = list(active_index(3, api.config.encoder.grid)), {}
    for m, p in zip(maps, plans):
        pos = m.player
        for k, a in enumerate(p.actions):
            pos = fl.move(m, pos, a)
            board = fl.render_canvas(m, pos, "classic", a, canvas=api.canvas)
            expected.setdefault(k, []).append(api.model.image_ids(board[None])[0, index])
    assert len(seen) == len(expected)
    for k, ids in enumerate(seen):
        assert torch.equal(ids.cpu(), torch.stack(expected[k]).cpu())


def test_neighbour_qa_is_evaluated_when_the_vocabulary_has_its_words(api):
    from latentum.apps.vsp.evaluate import QA_TASKS, extra_qa_tasks, qa_metrics
    from latentum.data.tokenizer import build_tokenizer
    from latentum.worlds.frozenlake import tasks as vsp

    assert extra_qa_tasks(api.tokenizer) == ("vsp_neighbours",)
    older = build_tokenizer(sorted(vsp.vocabulary() - {vsp.EDGE}))  # a model trained before the task existed
    assert extra_qa_tasks(older) == ()
    out = qa_metrics(api, 3, "classic", 2, seed=0)
    assert 0.0 <= out["vsp_neighbours"] <= 1.0
    assert out["perception"] == pytest.approx(np.mean([out[t] for t in QA_TASKS]))  # reported, not averaged in
    assert out["perception_scored"] == pytest.approx(np.mean([out["vsp_hole"], out["vsp_relation"],
                                                              out["vsp_grid_scored"]]))


def test_an_image_latent_is_its_encoded_active_grid_and_renders_as_its_own_reference(api, lake):
    from latentum.data.canvas import active_index

    m, image = lake
    latent = api.image_latent(entry.board_canvas(api, image))  # the board laid out cell by cell
    assert isinstance(latent, LatentImage) and latent.grid == m.size
    canvas = fl.render_canvas(m, canvas=api.canvas, style="classic")
    want = api.model.image_ids(canvas[None])[0, list(active_index(m.size, api.config.encoder.grid))].cpu()
    assert torch.equal(latent.ids, want)
    from latentum.generation.interleaved import answer_latents

    q = "Where is the player ?"  # a LatentImage question (item by item) equals the batched latent path
    read = answer_latents(api.model, api.tokenizer, latent.ids[None], [q], max_new_tokens=16)[0]
    assert api.answer(latent, q) == read
    own = np.asarray(api.render(latent, style="classic", reference=latent))
    assert np.array_equal(own, np.asarray(api.render(latent, style="classic")))  # None = its own codes
    with pytest.raises(ValueError, match="image"):
        api.image_latent(np.zeros((5, 5), np.uint8))
