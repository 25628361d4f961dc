"""VSP samplers: every answer is correct by construction (checked against simulate / the map / the pixel
oracle), labels are balanced, texts stay inside ``vocabulary()``, sampling is fast."""

import time

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from latentum.data.sample import Attempt, Sample, final_answer
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake import tasks as vsp

STYLES = fl.STYLES


def draws(sampler, n, seed=0, style=None, canvas=128):
    """n samples over all sizes (and both styles unless one is given)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = style or STYLES[i % 2]
        out.append(sampler(rng, 3 + i % 6, s, canvas))
    return out


def texts(sample: Sample) -> list[str]:
    return [x for x in sample.user + sample.assistant if isinstance(x, str)]


@pytest.mark.parametrize("task, sampler", list(vsp.SAMPLERS.items()))
def test_every_sampler_shape_and_meta(task, sampler):
    for s in draws(sampler, 12, canvas=64):
        assert isinstance(s, Sample) and s.task == task
        m = s.meta["map"]
        assert isinstance(m, fl.LakeMap) and m.size == s.meta["size"]
        assert all(im.shape == (64, 64, 3) for im in s.images)
        # the input map image shows exactly this map with the player at its start (or where its walk ended)
        user_img = next(x for x in s.user if isinstance(x, np.ndarray))
        style, pos = s.meta["style"], s.meta.get("pos", m.player)
        assert fl.read_canvas(user_img, m.size, style=style) == fl.state_of(m, pos, style)


def test_plan_sample_follows_bfs_and_imagined_boards_are_the_simulated_ones():
    for s in draws(vsp.plan_sample, 24):
        m, plan, style = s.meta["map"], s.meta["actions"], s.meta["style"]
        assert s.user[0] == vsp.PLAN_PROMPT and isinstance(s.user[1], np.ndarray)
        assert plan == fl.shortest_plan(m) and len(s.assistant) == 2 * len(plan) + 1
        assert s.assistant[-1] == vsp.DONE and s.assistant[0::2][:-1] == plan
        assert fl.simulate(m, plan, "gym").success and fl.simulate(m, plan, "strict").success
        positions = fl.simulate(m, plan, "strict").positions
        for k, (a, img) in enumerate(zip(plan, s.assistant[1::2])):
            np.testing.assert_array_equal(img, fl.render_canvas(m, positions[k + 1], style, a))
            assert fl.read_canvas(img, m.size).player == positions[k + 1]
        assert positions[-1] == m.goal


def test_retry_plan_sample_takes_back_one_imagined_fall_and_the_rest_is_the_plan():
    retried = 0
    for s in draws(vsp.retry_plan_sample, 36):
        m, plan, style = s.meta["map"], s.meta["actions"], s.meta["style"]
        if "retry" not in s.meta:  # no hole beside the path: a plain plan
            assert not any(isinstance(x, Attempt) for x in s.assistant) and len(s.assistant) == 2 * len(plan) + 1
            continue
        retried += 1
        k, bad = s.meta["retry"]
        pos = fl.simulate(m, plan, "strict").positions[k]
        fell = fl.move(m, pos, bad)
        assert fell in m.holes and isinstance(s.assistant[2 * k], Attempt) and s.assistant[2 * k] == bad
        np.testing.assert_array_equal(s.assistant[2 * k + 1], fl.render_canvas(m, fell, style, bad))
        assert s.assistant[2 * k + 2] == vsp.FELL
        rest = s.assistant[:2 * k] + s.assistant[2 * k + 3:]  # taking the attempt back leaves the BFS plan
        assert rest[0::2] == plan + [vsp.DONE] and not any(isinstance(x, Attempt) for x in rest)
    assert retried >= 24


def test_look_plan_samples_say_what_is_around_the_player_before_each_move():
    for s in draws(vsp.look_plan_sample, 12):
        m, plan, style = s.meta["map"], s.meta["actions"], s.meta["style"]
        positions = fl.simulate(m, plan, "strict").positions
        looks, moves, boards = s.assistant[0:-1:3], s.assistant[1::3], s.assistant[2::3]
        assert moves == plan and s.assistant[-1] == vsp.DONE and len(looks) == len(plan)
        for pos, look, a, board in zip(positions, looks, plan, boards):
            words = look.split()
            assert len(words) == 4
            for w, b in zip(words, fl.ACTIONS):  # left, below, right, above: what that move would enter
                nxt = fl.move(m, pos, b)
                assert w == (vsp.EDGE if nxt == pos else m.cell(nxt))
            assert words[fl.ACTIONS.index(a)] != "H"  # BFS never looks at a hole and walks into it
            np.testing.assert_array_equal(board, fl.render_canvas(m, fl.move(m, pos, a), style, a))
    for s in draws(vsp.text_look_plan_sample, 12):
        words = s.assistant[0].split()
        assert words[4::5] == s.meta["actions"] and words[-1] == vsp.DONE


def test_walk_look_samples_imagine_given_moves_that_may_turn_back_or_end_in_a_hole():
    samples = draws(vsp.walk_look_sample, 60)
    for s in samples:
        m, walk, style = s.meta["map"], s.meta["actions"], s.meta["style"]
        looks, moves, boards = s.assistant[0::3], s.assistant[1::3], s.assistant[2::3]
        assert 1 <= len(walk) <= 9 and moves == walk and len(looks) == len(boards) == len(walk)
        assert all(isinstance(a, Attempt) for a in moves), "given moves are read, never targets"
        pos = m.player
        for k, (look, a, board) in enumerate(zip(looks, moves, boards)):
            assert look == vsp.neighbour_words(m, pos)
            nxt = fl.move(m, pos, a)
            assert nxt != pos and nxt != m.goal, "in-grid moves that avoid the goal"
            assert (nxt in m.holes) == (k == len(walk) - 1 and not s.meta["safe"])
            pos = nxt
            np.testing.assert_array_equal(board, fl.render_canvas(m, pos, style, a))
    safe = [s.meta["safe"] for s in samples]
    assert 0.3 < np.mean(safe) < 0.8
    assert any(len(set(fl.simulate(s.meta["map"], s.meta["actions"], "gym").positions)) <= len(s.meta["actions"])
               for s in samples), "some walks come back to a cell they left"


def assert_asks_where_the_player_ends(s):
    """A "Where is the player ?" sample on the board after its moves, the player facing the last."""
    m, moves = s.meta["map"], s.meta["actions"]
    pos = m.player
    for a in moves:
        pos = fl.move(m, pos, a)
    assert pos == s.meta["pos"] and s.user[1] == vsp.PLAYER_Q
    assert s.assistant == [vsp.PLAYER_A.format(row=pos[0] + 1, col=pos[1] + 1)]
    np.testing.assert_array_equal(s.user[0], fl.render_canvas(m, pos, s.meta["style"], moves[-1]))


def test_walk_player_samples_ask_where_the_player_is_after_a_walk():
    samples = draws(vsp.walk_player_sample, 60)
    for s in samples:
        assert 1 <= len(s.meta["actions"]) <= 9
        assert_asks_where_the_player_ends(s)
    off_start = np.mean([s.meta["pos"] != s.meta["map"].player for s in samples])
    assert off_start > 0.6, "mostly boards where the start shows alone"


def test_plan_player_samples_ask_where_the_player_is_along_the_plan():
    samples = draws(vsp.plan_player_sample, 60)
    for s in samples:
        done = s.meta["actions"]
        assert len(done) >= 1 and done == fl.shortest_plan(s.meta["map"])[:len(done)]
        assert_asks_where_the_player_ends(s)
    on_goal = np.mean([s.meta["pos"] == s.meta["map"].goal for s in samples])
    assert 0.4 < on_goal < 0.9, "half the boards or more end the plan, on the goal"


def test_text_walk_look_samples_are_the_same_walks_and_looks_without_boards():
    for text, seen in zip(draws(vsp.text_walk_look_sample, 24), draws(vsp.walk_look_sample, 24)):
        assert text.user[0] == vsp.TEXT_PLAN_PROMPT and len(text.images) == 1
        assert text.meta["map"] == seen.meta["map"] and text.meta["actions"] == seen.meta["actions"]
        assert text.assistant[0::2] == seen.assistant[0::3] and text.assistant[1::2] == seen.assistant[1::3]
        assert all(isinstance(a, Attempt) for a in text.assistant[1::2]), "given moves are read, never targets"


def test_text_plan_sample_is_one_string():
    for s in draws(vsp.text_plan_sample, 12):
        m = s.meta["map"]
        assert s.assistant == [" ".join(fl.shortest_plan(m) + ["Done"])]
        assert not any(isinstance(x, np.ndarray) for x in s.assistant)


def test_hole_sample_correct_and_balanced():
    samples = draws(vsp.hole_sample, 200)
    for s in samples:
        m = s.meta["map"]
        words = s.user[1].split()
        r, c = int(words[words.index("row") + 1]) - 1, int(words[words.index("column") + 1]) - 1
        assert s.assistant == [vsp.YES if (r, c) in m.holes else vsp.NO]
    yes = np.mean([s.assistant[0] == vsp.YES for s in samples])
    assert 0.4 < yes < 0.6


def test_relation_sample_matches_vsp_t2_semantics():
    samples = draws(vsp.relation_sample, 120)
    for s in samples:
        m, words = s.meta["map"], s.assistant[0].split()
        (pr, pc), (gr, gc) = m.player, m.goal
        assert ("Above" in words) == (pr < gr) and ("Below" in words) == (pr > gr)
        assert ("Left" in words) == (pc < gc) and ("Right" in words) == (pc > gc)
        assert words == sorted(words, key=vsp.RELATIONS.index) and 1 <= len(words) <= 2
    assert len({s.assistant[0] for s in samples}) == 8  # all 8 non-empty answers occur


def test_relation_steps_sample_writes_both_cells_then_the_relation():
    samples = draws(vsp.relation_steps_sample, 60)
    for s in samples:
        m, text = s.meta["map"], s.assistant[0]
        (pr, pc), (gr, gc) = m.player, m.goal
        assert text.startswith(f"player row {pr + 1} column {pc + 1} , goal row {gr + 1} column {gc + 1} , ")
        assert final_answer(text) == vsp.relation_words(m.player, m.goal) == s.meta["answer"]
        assert s.user[1] == vsp.RELATION_Q  # the same question as the direct task
    assert final_answer("Above Left") == "Above Left"  # a direct answer is its own final answer


def test_grid_sample_has_one_true_option_and_a_near_miss():
    samples = draws(vsp.grid_sample, 60)
    for s in samples:
        m, opts = s.meta["map"], s.meta["options"]
        truth = m.text_grid()
        assert [k for k, v in opts.items() if v == truth] == s.assistant
        assert len(set(opts.values())) == 4
        assert all(f"{k} : {v}" in s.user[1] for k, v in opts.items())
        one_off = [v for v in opts.values()
                   if len(v) == len(truth) and sum(a != b for a, b in zip(v, truth)) == 1]
        assert len(one_off) >= 1
    assert {s.assistant[0] for s in samples} == set(vsp.OPTIONS)


def test_player_sample_answer_is_the_pixel_player():
    for s in draws(vsp.player_sample, 30):
        m = s.meta["map"]
        _, r, _, c = s.assistant[0].split()
        assert (int(r) - 1, int(c) - 1) == m.player
        assert fl.read_canvas(s.user[0], m.size).player == m.player


def test_describe_sample_is_the_pixel_map_as_text():
    for s in draws(vsp.describe_sample, 30):
        m = s.meta["map"]
        rows = [r.split() for r in s.assistant[0].split(" / ")]
        assert len(rows) == m.size and all(len(r) == m.size for r in rows)
        seen = fl.read_canvas(s.user[0], m.size)  # the answer describes what the image shows
        for r, row in enumerate(rows):
            for c, letter in enumerate(row):
                assert (letter == "H") == ((r, c) in seen.holes)
                assert (letter == "S") == ((r, c) == seen.player)
                assert (letter == "G") == ((r, c) == seen.goal)


def test_neighbour_sample_names_what_the_image_shows_next_to_the_player():
    """Checked against the pixels (read_canvas), not the generator's own map; edges appear on every size."""
    deltas = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
    words = set()
    for s in draws(vsp.neighbour_sample, 60):
        m = s.meta["map"]
        seen = fl.read_canvas(s.user[0], m.size)
        for a, word in zip(fl.ACTIONS, s.assistant[0].split(), strict=True):
            r, c = seen.player[0] + deltas[a][0], seen.player[1] + deltas[a][1]
            if not (0 <= r < m.size and 0 <= c < m.size):
                assert word == vsp.EDGE
            else:
                assert word == ("H" if (r, c) in seen.holes else "G" if (r, c) == seen.goal else "F")
            words.add(word)
    assert words == {"F", "H", "G", vsp.EDGE}


def test_safety_sample_correct_balanced_and_all_lengths():
    samples = draws(vsp.safety_sample, 200)
    for s in samples:
        m, actions = s.meta["map"], s.meta["actions"]
        assert s.user[1] == vsp.SAFETY_Q.format(actions=" ".join(actions))
        safe = fl.simulate(m, actions, "gym").reason != "hole"
        assert s.assistant == [vsp.YES if safe else vsp.NO]
    assert {len(s.meta["actions"]) for s in samples} == set(vsp.SAFETY_LENGTHS)
    assert 0.4 < np.mean([s.assistant[0] == vsp.YES for s in samples]) < 0.6


def test_vocabulary_covers_every_text_with_a_word_level_tokenizer():
    vocab = vsp.vocabulary()
    table = {w: i for i, w in enumerate(sorted(vocab | {"<unk>"}))}
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    unk = table["<unk>"]
    for sampler in vsp.SAMPLERS.values():
        for s in draws(sampler, 40, seed=3):
            for t in texts(s):
                assert set(t.split()) <= vocab, t
                assert unk not in tok.encode(t).ids
    assert "Done" in vocab and "?" in vocab and "/" in vocab and ":" in vocab


@pytest.mark.parametrize("sampler", list(vsp.SAMPLERS.values()))
def test_samplers_are_seeded(sampler):
    a, b = draws(sampler, 4, seed=11), draws(sampler, 4, seed=11)
    for x, y in zip(a, b):
        assert texts(x) == texts(y)
        assert all(np.array_equal(i, j) for i, j in zip(x.images, y.images))


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=9, style="classic"), "size"),
    (dict(size=4, style="pixel"), "style"),
    (dict(size=4, style="classic", canvas=100), "canvas"),
])
def test_samplers_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vsp.plan_sample(np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize("style", STYLES)
def test_plan_sample_is_fast(style):
    rng = np.random.default_rng(0)
    vsp.plan_sample(rng, 8, style)  # builds the tile atlas once
    t = time.perf_counter()
    for _ in range(20):
        vsp.plan_sample(rng, 8, style)
    assert (time.perf_counter() - t) / 20 < 0.010


def test_a_true_transcript_answers_every_hole_and_grid_question_and_a_wrong_one_does_not():
    from latentum.apps.vsp.evaluate import read_answer

    rng = np.random.default_rng(11)
    for size in (3, 5, 8):
        for sampler in (vsp.hole_sample, vsp.grid_sample):
            s = sampler(rng, size, "classic", 64)
            truth = s.meta["map"].text_grid()
            assert read_answer(s, truth) == s.meta["answer"]
            assert read_answer(s, "") != s.meta["answer"]
    s = vsp.hole_sample(np.random.default_rng(2), 4, "classic", 64)
    rows = [row.split() for row in s.meta["map"].text_grid().split(" / ")]
    r, c = s.meta["cell"]
    rows[r][c] = "F" if rows[r][c] == "H" else "H"  # the asked cell transcribed wrong flips the answer
    assert read_answer(s, " / ".join(" ".join(row) for row in rows)) != s.meta["answer"]
