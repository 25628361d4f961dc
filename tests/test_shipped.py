"""The shipped checkpoint: it loads, plans fixed maps of both render styles into valid moves and thoughts, and
(slow) is held to the VSP targets of issue #3 by the full evaluation."""

from pathlib import Path

import pytest

from latentum import LatentImage, LatentUM
from latentum.apps.vsp import entry
from latentum.apps.vsp.evaluate import eval_maps, evaluate_vsp
from latentum.apps.vsp.planner import HAZARDS
from latentum.worlds import frozenlake as fl

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"


@pytest.fixture(scope="module")
def api():
    assert (CKPT / "config.json").is_file(), "checkpoints/tiny is part of the repository"
    return LatentUM.from_pretrained(CKPT)


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_plans_fixed_maps(api, style):
    maps = [m for level in (3, 5) for m in eval_maps(level, 2, seed=2024)]
    plans = entry.plan_batch(api, [fl.render(m, style=style) for m in maps], max_steps=6)
    for m, p in zip(maps, plans):
        assert set(p.actions) <= set(fl.ACTIONS) and len(p.actions) <= 6
        assert len(p.thoughts) == len(p.actions)
        assert all(isinstance(t, LatentImage) and t.grid == m.size for t in p.thoughts)
        fl.simulate(m, p.actions, "strict")  # scorable under both rules
    assert api.decoder_path is not None, "the shipped model carries its pixel decoder"
    thoughts = [t for p in plans for t in p.thoughts]
    if thoughts:
        size = api.decoder.cfg.resolution
        assert api.render(thoughts[0]).size == (size, size)


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_solves_most_small_fixed_maps(api, style):
    """Regression guard for the shipped weights and the planner: on ten fixed 3x3 maps it reached the goal
    10/10 in each style under the strict rule when shipped (greedy, so deterministic; 24 of its 24 looks right
    in each style; 10/10 and 22 of 22 for the previous weights); a broken image path, cache or sampler drops it
    to near zero."""
    maps = eval_maps(3, 10, seed=2024)
    plans = entry.plan_batch(api, [fl.render(m, style=style) for m in maps], max_steps=6)
    solved = sum(fl.simulate(m, p.actions, "strict").success for m, p in zip(maps, plans))
    assert solved >= 7, f"{style}: {solved}/10 fixed 3x3 maps solved"


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_imagines_given_moves_and_tells_safe_from_unsafe(api, style):
    """Safety with visual thoughts on ten fixed 4x4 questions: the model follows each sequence, looking before
    every move; when shipped it answered all ten right in each style (greedy, so deterministic)."""
    import numpy as np

    from latentum.apps.vsp.planner import falls_at
    from latentum.worlds.registry import make_sample

    rng = np.random.default_rng(2024)
    samples = [make_sample("vsp_safety", rng, map_sizes=[4], canvas=api.canvas, style=style) for _ in range(10)]
    plans = entry.imagine_batch(api, [s.user[0] for s in samples], [s.meta["actions"] for s in samples])
    for s, p in zip(samples, plans):
        assert p.actions == s.meta["actions"][:len(p.actions)] and len(p.looks) == len(p.thoughts) == len(p.actions)
    right = sum((falls_at(p) is None) == (s.meta["answer"] == "Yes") for s, p in zip(samples, plans))
    assert right >= 7, f"{style}: {right}/10 safety questions right"


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_works_out_where_the_player_is_relative_to_the_goal(api, style):
    """VSP T2 on twenty fixed 6x6 questions, answered in steps ("player row 2 column 3 , goal row 4 column 4 ,
    Above Left", ``vsp_relation_steps``) and scored on the words after the last comma: when shipped it
    answered 19/20 (gymnasium) and 20/20 (classic); the previous weights, answering directly, 20/20."""
    import numpy as np

    from latentum.data.sample import final_answer
    from latentum.worlds.registry import make_sample

    rng = np.random.default_rng(2024)
    samples = [make_sample("vsp_relation", rng, map_sizes=[6], canvas=api.canvas, style=style) for _ in range(20)]
    said = api.answer_batch([s.user[0] for s in samples], [s.user[1] for s in samples], max_new_tokens=20)
    right = sum(final_answer(a) == s.meta["answer"] for a, s in zip(said, samples))
    assert right >= 17, f"{style}: {right}/20 relation questions right"


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_picks_the_text_grid_of_the_map(api, style):
    """VSP T3 on twenty fixed 5x5 questions in the cloze form (``LatentUM.choose``: the option the model finds
    most likely as the map's text grid; one distractor differs in a single cell): when shipped it chose
    20/20 in each style (asked for the letter, the model is below chance: README, "Results")."""
    import numpy as np

    from latentum.worlds.frozenlake import tasks as vsp
    from latentum.worlds.registry import make_sample

    rng = np.random.default_rng(2024)
    samples = [make_sample("vsp_grid", rng, map_sizes=[5], canvas=api.canvas, style=style) for _ in range(20)]
    options = [list(s.meta["options"].values()) for s in samples]
    scores = api.score_options_batch([s.user[0] for s in samples], [vsp.DESCRIBE_Q] * 20, options)
    right = sum(o[int(np.argmax(sc))] == s.meta["map"].text_grid() for o, sc, s in zip(options, scores, samples))
    assert right >= 17, f"{style}: {right}/20 grid questions right"


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_shipped_model_answers_where_the_holes_are(api, style):
    """VSP T1 on twenty fixed 4x4 questions, "Is there a hole at row R column C ?" (coordinates grounded,
    README "Written coordinates, grounded"): when shipped it answered 20/20 in each style; the previous
    weights, which read coordinates as plain words, 9/20."""
    import numpy as np

    from latentum.worlds.registry import make_sample

    rng = np.random.default_rng(2024)
    samples = [make_sample("vsp_hole", rng, map_sizes=[4], canvas=api.canvas, style=style) for _ in range(20)]
    said = api.answer_batch([s.user[0] for s in samples], [s.user[1] for s in samples], max_new_tokens=4)
    right = sum(a == api.tokenizer.normalize(s.assistant[0]) for a, s in zip(said, samples))
    assert right >= 17, f"{style}: {right}/20 hole questions right"


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_continuous_batching_plans_every_map_as_it_would_alone(api, style):
    """Twelve fresh maps of six sizes through four rows (a finished plan's row goes to the next map): the same
    moves, looks, take-backs and thought codes as one map at a time."""
    maps = [m for level in (3, 4, 5, 6, 7, 8) for m in eval_maps(level, 2, seed=11)]
    images = [fl.render(m, style=style) for m in maps]
    together = entry.plan_batch(api, images, batch=4)
    for b, s in zip(together, [entry.plan(api, im) for im in images]):
        assert (b.actions, b.looks, b.done) == (s.actions, s.looks, s.done)
        assert [(k, a) for k, a, _ in b.retracted] == [(k, a) for k, a, _ in s.retracted]
        assert all(x.ids.equal(y.ids) for x, y in zip(b.thoughts, s.thoughts))


@pytest.mark.parametrize("style", ["gymnasium", "classic"])
def test_drafted_thoughts_equal_token_by_token_thoughts(api, style):
    """Drafting each greedy thought (and checking each look against a guess) changes the speed, not the plan:
    the same moves, looks and thought codes as one token per forward, on fixed maps of three sizes, batched and
    alone."""
    maps = [m for level in (4, 6, 8) for m in eval_maps(level, 2, seed=7)]
    images = [fl.render(m, style=style) for m in maps]
    for batch in (images, images[-1:]):
        slow = entry.plan_batch(api, batch, max_steps=8, draft_thoughts=False)
        fast = entry.plan_batch(api, batch, max_steps=8)
        for s, f in zip(slow, fast):
            assert (s.actions, s.looks) == (f.actions, f.looks)
            assert [(k, a) for k, a, _ in s.retracted] == [(k, a) for k, a, _ in f.retracted]
            assert all(a.ids.equal(b.ids) for a, b in zip(s.thoughts, f.thoughts))


@pytest.mark.slow
def test_full_vsp_evaluation_meets_targets(api):
    report = evaluate_vsp(api, per_level=100)
    for style, s in report["summary"].items():
        assert s["latent"]["strict"] >= 0.95 and s["latent"]["min_strict"] >= 0.90, style
        assert s["qa"]["perception_scored"] >= 0.99 and s["qa"]["vsp_safety_imagined"] >= 0.95, style  # cloze grid


def _moves_into_said_hazards(plan) -> int:
    """Moves into a cell the look just before named a hole or the edge, while the look left another move."""
    bad = 0
    for a, look in zip(plan.actions, plan.looks):
        said = look.split() if look else []
        hazard = [w in HAZARDS for w in said]
        if said and hazard[fl.ACTIONS.index(a)] and not all(hazard):
            bad += 1
    return bad


def test_heed_looks_never_moves_where_the_look_saw_a_hazard(api):
    """Maps 4 and 5 of these fixed 7x7 maps each get a move into a cell the model itself just called a hole
    when it plans freely; held to its looks, no plan does."""
    maps = eval_maps(7, 6, seed=1)
    images = [fl.render(m, style="gymnasium") for m in maps]
    free = entry.plan_batch(api, images, heed_looks=False)
    heeded = entry.plan_batch(api, images)  # heed_looks is the default
    assert sum(map(_moves_into_said_hazards, free)) >= 1
    assert sum(map(_moves_into_said_hazards, heeded)) == 0
    assert all(len(p.looks) == len(p.actions) for p in heeded)
