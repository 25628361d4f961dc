"""The planner's take-back step: after a thought the model may say "hole" (``vsp.FELL``); the move and its
thought are dropped and another move is chosen from the board before it."""

import numpy as np
import pytest
import torch

from latentum import LatentUM
from latentum.apps.vsp import entry
from latentum.generation.engine import Decoder
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake.tasks import FELL


@pytest.fixture(scope="module")
def api(untrained_model):
    return LatentUM.from_pretrained(untrained_model)


def _force_fell(monkeypatch, api, when, never_done: bool = False):
    """Make "hole" the top token whenever ``when(decoder, logits (B, V)) -> (B,) bool`` holds (and with
    ``never_done``, "Done" the last resort)."""
    fell, done = api.tokenizer.token_to_id(FELL), api.tokenizer.token_to_id("Done")
    real = Decoder.text_logits

    def text_logits(self):
        logits = real(self)
        top = logits.max(-1).values + 1.0
        logits[:, fell] = torch.where(when(self, logits), top, torch.full_like(top, -1e9))
        if never_done:
            logits[:, done] = -1e9
        return logits

    monkeypatch.setattr(Decoder, "text_logits", text_logits)


def _maps(n, size=4):
    rng = np.random.default_rng(3)
    return [fl.generate_map(size, rng) for _ in range(n)]


@torch.no_grad()
def test_a_model_that_always_falls_tries_each_move_once_then_stops(api, monkeypatch):
    _force_fell(monkeypatch, api, lambda dec, logits: torch.ones(dec.batch, dtype=torch.bool), never_done=True)
    plan = entry.plan(api, fl.render(_maps(1)[0]), max_steps=10, heed_looks=False)  # its looks may name the goal
    assert plan.actions == [] and plan.thoughts == [] and plan.done
    assert sorted(a for _, a, _ in plan.retracted) == sorted(fl.ACTIONS)  # each move tried once, never twice


@torch.no_grad()
def test_take_backs_in_a_batch_equal_single_rows(api, monkeypatch):
    """Rows that take a move back get a padding slot in the others' cache: batched plans == one at a time."""
    moves = [api.tokenizer.token_to_id(a) for a in fl.ACTIONS]

    def when(dec, logits):  # a row's own state: its length and its favourite move
        return (dec.next_pos.cpu() + logits[:, moves].argmax(-1).cpu()) % 3 == 0

    _force_fell(monkeypatch, api, when, never_done=True)
    images = [fl.render(m) for m in _maps(6)]
    batch = entry.plan_batch(api, images, max_steps=6, heed_looks=False)  # random looks may name the goal
    single = [entry.plan(api, im, max_steps=6, heed_looks=False) for im in images]
    assert sum(len(p.retracted) for p in batch) > 0  # the test exercises take-backs
    for b, s in zip(batch, single):
        assert b.actions == s.actions and [(k, a) for k, a, _ in b.retracted] == [(k, a) for k, a, _ in s.retracted]
        assert len(b.thoughts) == len(b.actions)
        assert all(torch.equal(x.ids, y.ids) for x, y in zip(b.thoughts, s.thoughts))


@torch.no_grad()
@pytest.mark.parametrize("batch", [2, 16])
def test_continuous_batches_of_mixed_sizes_equal_single_rows(api, monkeypatch, batch):
    """Maps of three sizes share the batch, and with fewer rows than maps a row whose plan ends goes to the
    next map mid-stream: every plan (moves, looks, take-backs, thoughts) equals its one-at-a-time plan."""
    moves = [api.tokenizer.token_to_id(a) for a in fl.ACTIONS]
    replaced = []
    real = Decoder.take_rows
    monkeypatch.setattr(Decoder, "take_rows", lambda self, *a: replaced.append(self.cache.length > 0) or real(self, *a))

    def when(dec, logits):
        return (dec.next_pos.cpu() + logits[:, moves].argmax(-1).cpu()) % 3 == 0

    _force_fell(monkeypatch, api, when, never_done=True)
    images = [fl.render(m) for size in (3, 5, 4) for m in _maps(2, size)]  # budgets 12, 20, 16 moves
    together = entry.plan_batch(api, images, heed_looks=False, batch=batch)
    for b, s in zip(together, [entry.plan(api, im, heed_looks=False) for im in images]):
        assert (b.actions, b.looks) == (s.actions, s.looks)
        assert [(k, a) for k, a, _ in b.retracted] == [(k, a) for k, a, _ in s.retracted]
        assert all(torch.equal(x.ids, y.ids) for x, y in zip(b.thoughts, s.thoughts))
    assert sum(len(p.retracted) for p in together) > 0 and (batch > 2 or any(replaced))  # mid-stream


@torch.no_grad()
def test_a_row_that_is_done_at_once_sits_out_the_step_of_the_others(api, monkeypatch):
    """Greedy plans, drafted: one row says "Done" before any move while the others move and think."""
    tok = api.tokenizer
    done, looks = tok.token_to_id("Done"), [tok.token_to_id(w) for w in ("F", "H", "G", "S", "Edge", FELL)]
    real = Decoder.text_logits

    def text_logits(self):  # row 0 of the first decoder step says Done, every other choice is a move
        logits = real(self)
        logits[:, looks] = -1e9
        first = not getattr(self, "_spoke", False)
        self._spoke = True
        logits[:, done] = -1e9
        if first and self.batch > 1:
            logits[0, done] = logits.max() + 1.0
        return logits

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    plans = entry.plan_batch(api, [fl.render(m) for m in _maps(3)], max_steps=2, heed_looks=False)
    assert (plans[0].actions, plans[0].done) == ([], True)
    assert all(len(p.actions) == 2 and len(p.thoughts) == 2 for p in plans[1:])


@torch.no_grad()
def test_plans_that_each_fill_most_of_the_context_still_fit_when_batched(api, monkeypatch):
    """Rows that end free their keys before new maps come in, and the cache is compacted when a step would
    not fit: plans that fit alone fit in a batch whose rows restart many times."""
    tok = api.tokenizer
    banned = [tok.token_to_id("Done"), tok.token_to_id(FELL)]
    real = Decoder.text_logits

    def text_logits(self):
        logits = real(self)
        logits[:, banned] = -1e9
        return logits

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    images = [fl.render(m) for m in _maps(3, size=8)]
    steps = (api.config.backbone.max_seq_len - 200) // (64 + 2 + 6)  # one plan takes most of the context
    together = entry.plan_batch(api, images, max_steps=steps, heed_looks=False, batch=2)
    alone = entry.plan(api, images[2], max_steps=steps, heed_looks=False)
    assert [len(p.actions) for p in together] == [steps] * 3 and together[2].actions == alone.actions


def test_no_maps_make_no_plans(api):
    assert entry.plan_batch(api, []) == []


def test_a_bad_batch_is_refused(api):
    with pytest.raises(ValueError, match="batch must be"):
        entry.plan_batch(api, [fl.render(_maps(1)[0])], batch=0)


@torch.no_grad()
def test_text_only_plans_never_take_back(api, monkeypatch):
    _force_fell(monkeypatch, api, lambda dec, logits: torch.ones(dec.batch, dtype=torch.bool), never_done=True)
    plan = entry.plan_batch(api, [fl.render(_maps(1)[0])], max_steps=3, thoughts="none", heed_looks=False)[0]
    assert plan.retracted == [] and len(plan.actions) == 3


def test_takeback_metrics_replay_the_kept_moves():
    from latentum.apps.vsp.evaluate import takeback_metrics
    from latentum.apps.vsp.planner import Plan

    m = fl.LakeMap.from_desc(["SFH", "FFF", "HFG"])  # player (0, 0); holes (0, 2) and (2, 0)
    plan = Plan(actions=["R", "D", "D", "R"], retracted=[(1, "R", None), (0, "D", None), (2, "L", None)])
    # after 1 kept move the player is at (0, 1): R enters (0, 2), a hole; D from (0, 0) does not;
    # after 2 kept moves (1, 1): L goes to (1, 0), not a hole.
    assert takeback_metrics([m], [plan]) == {"takebacks": 3.0, "takeback_hole": 1 / 3}
    assert np.isnan(takeback_metrics([m], [Plan()])["takeback_hole"])


def test_look_metrics_judge_each_look_at_the_cell_the_kept_moves_reached():
    from latentum.apps.vsp.evaluate import look_checks, look_metrics
    from latentum.apps.vsp.planner import Plan

    m = fl.LakeMap.from_desc(["SFH", "FFF", "HFG"])  # player (0, 0); holes (0, 2) and (2, 0)
    # at (0, 0): left Edge, below F, right F, above Edge; at (0, 1): F F H Edge (wrongly said F F F Edge)
    plan = Plan(actions=["R", "D"], looks=["Edge F F Edge", "F F F Edge"])
    assert look_checks(m, plan) == [True, False]
    assert look_metrics([m], [plan]) == {"look_exact": 0.5}
    assert look_metrics([m], [Plan(actions=["R"], looks=[None])]) == {}


@torch.no_grad()
def test_a_model_that_looks_says_four_words_before_every_move(api, monkeypatch):
    """A look word first makes the planner take a whole look (4 words), then a move: ``Plan.looks`` lines up
    with the moves, and batched plans equal one-at-a-time plans."""
    tok = api.tokenizer
    looks = [tok.token_to_id(w) for w in ("F", "H", "G", "S", "Edge")]
    real = Decoder.text_logits

    def text_logits(self):  # look first, then the model's own favourite move (never "Done")
        logits = real(self)
        said_look = torch.isin(self._last_ids, torch.tensor(looks)) if hasattr(self, "_last_ids") else None
        top = logits.max(-1).values + 1.0
        if said_look is None or not said_look.any():
            logits[:, looks[0]] = top
        logits[:, tok.token_to_id("Done")] = -1e9
        return logits

    real_feed_ids = Decoder.feed_ids

    def feed_ids(self, ids, *args, **kwargs):
        self._last_ids = ids[:, -1].cpu()
        return real_feed_ids(self, ids, *args, **kwargs)

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    monkeypatch.setattr(Decoder, "feed_ids", feed_ids)
    images = [fl.render(m) for m in _maps(3)]
    batch = entry.plan_batch(api, images, max_steps=3, heed_looks=False)  # its looks may name the goal: no early end
    one_by_one = entry.plan_batch(api, images, max_steps=3, heed_looks=False, draft_thoughts=False)  # no guesses
    for b, s, w in zip(batch, [entry.plan(api, im, max_steps=3, heed_looks=False) for im in images], one_by_one):
        assert len(b.actions) == len(b.looks) == 3 and b.actions == s.actions and b.looks == s.looks
        assert (w.actions, w.looks) == (b.actions, b.looks)  # words checked against a guess: the same words
        assert all(look.split()[0] == "F" and len(look.split()) == 4 for look in b.looks)
        assert all(set(look.split()) <= {"F", "H", "G", "S", "Edge"} for look in b.looks)


def test_heeding_rules_out_moves_into_named_hazards_unless_none_is_left():
    from latentum.apps.vsp.planner import _heeding

    words = {"F": 1, "H": 2, "Edge": 3}
    tok = type("Tok", (), {"token_to_id": staticmethod(words.get)})()
    move_ids = [10, 11, 12, 13]  # L D R U
    moves = torch.zeros(2, 16, dtype=torch.bool)
    moves[:, move_ids] = True
    said = torch.tensor([[2, 1, 3, 1],   # L is a hole, R the edge: D and U are left
                         [2, 2, 3, 3]])  # every move is a hazard: nothing is ruled out
    allowed = _heeding(moves, said, move_ids, tok)
    assert allowed[0].nonzero().flatten().tolist() == [11, 13]
    assert torch.equal(allowed[1], moves[1])
    assert torch.equal(moves[:, move_ids], torch.ones(2, 4, dtype=torch.bool)), "moves is left as it was"


def test_falls_at_is_the_first_move_into_a_cell_its_look_named_a_hole():
    from latentum.apps.vsp.planner import Plan, falls_at

    #                                L D R U
    plan = Plan(actions=["R", "D", "L"], looks=["F H F Edge", "H F F F", "H F F F"])
    assert falls_at(plan) == 2  # D was next to a hole (L), but only L walks into one
    assert falls_at(Plan(actions=["D"], looks=["F H F Edge"])) == 0
    assert falls_at(Plan(actions=["R", "U"], looks=["F H F Edge", None])) is None


@torch.no_grad()
def test_imagine_follows_the_given_moves_looks_before_each_and_stops_at_a_named_hole(api, monkeypatch):
    tok = api.tokenizer
    hole, ice = tok.token_to_id("H"), tok.token_to_id("F")
    real = Decoder.text_logits

    def text_logits(self):  # every look names ice, except below the player: a hole
        logits = real(self)
        top = logits.max(-1).values + 1.0
        said = getattr(self, "_said", 0)
        logits[:, hole if said % 5 == 1 else ice] = top  # per move: 4 look words, then the given move
        self._said = said + 1
        return logits

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    images = [fl.render(m) for m in _maps(3)]
    walks = [["R", "L", "R"], ["R", "D", "U"], ["U"]]
    plans = entry.imagine_batch(api, images, walks)
    assert [p.actions for p in plans] == [["R", "L", "R"], ["R", "D"], ["U"]]  # the second stops at its fall
    for p in plans:
        assert len(p.looks) == len(p.thoughts) == len(p.actions)
        assert all(look == "F H F F" for look in p.looks)
        assert all(t.ids.shape == (16, api.config.quantizer.codebooks) for t in p.thoughts)


@torch.no_grad()
def test_imagine_batched_equals_alone_and_drafted_equals_token_by_token(api):
    from latentum.apps.vsp.planner import imagine_rows
    from latentum.types import GREEDY

    images = [fl.render(m) for m in _maps(2)] + [fl.render(m) for m in _maps(1, size=3)]
    walks = [["R", "L"], ["D"], ["U", "D", "U"]]
    batch = entry.imagine_batch(api, images, walks)
    canvases = [entry.board_canvas(api, im) for im in images]
    slow = imagine_rows(api, canvases, walks, GREEDY, None, draft_thoughts=False)
    for b, s, im, w in zip(batch, slow, images, walks):
        alone = entry.imagine(api, im, " ".join(w))
        for other in (alone, s):
            assert b.actions == other.actions and b.looks == other.looks
            assert all(torch.equal(x.ids, y.ids) for x, y in zip(b.thoughts, other.thoughts))


def test_imagine_rejects_bad_moves(api):
    image = fl.render(_maps(1)[0])
    with pytest.raises(ValueError, match=r"actions\[0\] must be a non-empty list of moves"):
        entry.imagine(api, image, "R X")
    with pytest.raises(ValueError, match=r"actions\[0\]"):
        entry.imagine(api, image, [])
    with pytest.raises(ValueError, match="one move sequence per image"):
        entry.imagine_batch(api, [image, image], ["R"])



# --- the pixel-mediated planner: each thought is rendered (given its input map) and re-encoded before it is read


@pytest.fixture(scope="module")
def pixel_api(debug_run, tmp_path_factory):
    """The debug model with a random-init decoder in place of its own, its code projection scaled up so the
    reference's effect on the render is visible."""
    import shutil

    from latentum.checkpoint import load_decoder_folder, save_decoder_folder
    from latentum.model.decoder import PixelDecoder

    folder = tmp_path_factory.mktemp("pixel") / "model"
    shutil.copytree(debug_run / "model", folder, ignore=shutil.ignore_patterns("decoder"))
    trained = load_decoder_folder(debug_run / "model" / "decoder")
    torch.manual_seed(0)
    dec = PixelDecoder(trained.cfg, trained.code_dim, trained.grid)
    with torch.no_grad():
        dec.cond[-1].weight.mul_(50)  # make the reference's effect on the render visible
    save_decoder_folder(dec, folder / "decoder")
    return LatentUM.from_pretrained(folder)


def _well_formed(plans, sizes, codebooks):
    for p, g in zip(plans, sizes):
        assert len(p.actions) == len(p.thoughts) == len(p.looks) and set(p.actions) <= set(fl.ACTIONS)
        for t in p.thoughts + [t for _, _, t in p.retracted]:
            assert t.ids.shape == (g * g, codebooks) and t.ids.dtype == torch.long


@torch.no_grad()
def test_pixel_mediated_plans_on_the_debug_model_are_well_formed(debug_run):
    api = LatentUM.from_pretrained(debug_run / "model")
    assert api.decoder_path is not None
    maps = _maps(2, size=4) + _maps(1, size=3)
    images = [fl.render(m, style=s) for m, s in zip(maps, ["gymnasium", "classic", "classic"])]
    plans = entry.plan_batch(api, images, thoughts="pixel", max_steps=4)
    assert len(plans) == 3
    _well_formed(plans, [4, 4, 3], api.config.quantizer.codebooks)


@torch.no_grad()
def test_pixel_mediated_plans_draw_each_thought_given_its_own_input_map(pixel_api, monkeypatch):
    """Every render of the round trip gets, per row, the codes of that row's input map (as the planner encoded
    it), in the map's style; the plans are well formed."""
    from latentum.apps.vsp.planner import _board_codes

    api = pixel_api
    maps = _maps(3, size=4)
    styles = ["gymnasium", "classic", "gymnasium"]
    images = [fl.render(m, style=s) for m, s in zip(maps, styles)]
    starts = _board_codes(api, [entry.board_canvas(api, im) for im in images], 4)  # (3, 16, G)
    assert len({tuple(x.flatten().tolist()) for x in starts}) == 3  # three different maps
    calls = []
    real = LatentUM.render_ids

    def spy(self, ids, **kw):
        calls.append((ids.cpu(), kw["style"], kw["reference"].cpu()))
        return real(self, ids, **kw)

    monkeypatch.setattr(LatentUM, "render_ids", spy)
    plans = entry.plan_batch(api, images, thoughts="pixel", max_steps=4)
    _well_formed(plans, [4, 4, 4], api.config.quantizer.codebooks)
    thoughts = [[t.ids for t in p.thoughts] + [t.ids for _, _, t in p.retracted] for p in plans]
    assert calls and sum(len(ids) for ids, _, _ in calls) == sum(len(t) for t in thoughts)
    for ids, style, refs in calls:
        for x, s, ref in zip(ids, style, refs):
            r = next(i for i in range(3) if torch.equal(ref, starts[i]))  # the input map of row r ...
            assert s == styles[r]  # ... drawn in its style ...
            assert any(torch.equal(x, t) for t in thoughts[r])  # ... and the thought is row r's


def test_pixel_round_trip_maps_batch_rows_to_their_plans_references(pixel_api, monkeypatch):
    from latentum.apps.vsp.planner import _pixel_round_trip

    api, G = pixel_api, pixel_api.config.quantizer.codebooks
    refs = torch.stack([torch.full((9, G), i) for i in range(4)])  # row i's map: all codes i
    seen = {}

    def fake(self, ids, *, style=None, reference=None, **kw):
        seen.update(style=style, reference=reference)
        return np.zeros((len(ids), 16, 16, 3), np.uint8)

    monkeypatch.setattr(LatentUM, "render_ids", fake)
    reread = _pixel_round_trip(api, 3, ["gymnasium", "classic", None, "classic"], refs)
    out = reread(torch.zeros(2, 9, G, dtype=torch.long), rows=[3, 1])  # rows 0 and 2 have finished
    assert out.shape == (2, 9, G)
    assert seen["style"] == ["classic", "classic"] and torch.equal(seen["reference"], refs[[3, 1]])


def test_fresh_moves_are_those_to_a_cell_the_plan_has_not_stood_on():
    from latentum.apps.vsp.planner import _fresh_moves

    ids = [10, 11, 12, 13]  # L D R U
    fresh = _fresh_moves([["R", "D", "L"], []], ids, 16)  # cells (0,0) (0,1) (1,1) (1,0); then just (0,0)
    assert fresh[0, ids].tolist() == [True, True, False, False]  # R and U go back
    assert fresh[1, ids].tolist() == [True, True, True, True]
    assert not fresh[:, :10].any() and not fresh[:, 14:].any()


@torch.no_grad()
def test_avoid_revisits_keeps_a_model_that_turns_back_on_new_cells(api, monkeypatch):
    """A model that looks, then always favours the move undoing its last one: free, it paces back and forth;
    with ``avoid_revisits`` it never steps on a cell of its plan twice (a new cell is always left here)."""
    tok = api.tokenizer
    looks = [tok.token_to_id(w) for w in ("F", "H", "G", "S", "Edge")]
    moves = [tok.token_to_id(a) for a in fl.ACTIONS]
    back = {moves[i]: moves[j] for i, j in ((0, 2), (1, 3), (2, 0), (3, 1))}
    real, real_feed_ids = Decoder.text_logits, Decoder.feed_ids

    def text_logits(self):
        logits = real(self)
        top = logits.max(-1).values + 1.0
        last = getattr(self, "_last_ids", None)
        if last is None or not torch.isin(last, torch.tensor(looks)).any():
            logits[:, looks[0]] = top
        for r, m in enumerate(getattr(self, "_last_move", [None] * self.batch)):
            logits[r, back.get(m, moves[2])] = top[r] + 1.0
        logits[:, tok.token_to_id("Done")] = -1e9
        return logits

    def feed_ids(self, ids, *args, **kwargs):
        self._last_ids = ids[:, -1].cpu()
        prev = getattr(self, "_last_move", [None] * ids.shape[0])
        self._last_move = [t if t in moves else p for t, p in zip(self._last_ids.tolist(), prev)]
        return real_feed_ids(self, ids, *args, **kwargs)

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    monkeypatch.setattr(Decoder, "feed_ids", feed_ids)
    images = [fl.render(m) for m in _maps(2)]
    for avoid in (False, True):
        for plan in entry.plan_batch(api, images, max_steps=5, heed_looks=False, avoid_revisits=avoid):
            cells = [(0, 0)]
            for a in plan.actions:
                cells.append(fl.displace(cells[-1], a))
            assert len(plan.actions) == 5
            assert (len(set(cells)) == len(cells)) == avoid, (avoid, plan.actions)


@torch.no_grad()
def test_heeded_plans_end_right_after_a_move_into_the_cell_their_look_named_the_goal(api, monkeypatch):
    """A model that looks "G G G G" before every move and favours "Done" above all: held to its looks, it
    makes one move and then must end; free, it says "Done" at once (no move)."""
    tok = api.tokenizer
    goal, done = tok.token_to_id("G"), tok.token_to_id("Done")
    real = Decoder.text_logits

    def text_logits(self):
        logits = real(self)
        logits[:, goal] = logits.max(-1).values + 1.0
        logits[:, done] = logits.max(-1).values + 1.0
        return logits

    monkeypatch.setattr(Decoder, "text_logits", text_logits)
    image = fl.render(_maps(1)[0])
    heeded = entry.plan(api, image, max_steps=5)
    assert len(heeded.actions) == 1 and heeded.looks == ["G G G G"] and heeded.done
    assert entry.plan(api, image, max_steps=5, heed_looks=False).actions == []


def test_goal_named_reads_the_look_in_the_last_moves_direction():
    from latentum.apps.vsp.planner import Plan, goal_named

    assert goal_named(Plan(actions=["R"], looks=["F H G Edge"])) is True  # right of the player: G
    assert goal_named(Plan(actions=["D"], looks=["F H G Edge"])) is False
    assert goal_named(Plan(actions=["D"], looks=[None])) is None and goal_named(Plan()) is False


@torch.no_grad()
def test_a_model_loaded_in_bf16_reads_its_maps_and_plans(untrained_model):
    """``from_pretrained(dtype=torch.bfloat16)``: the map pixels are read in the encoder's own dtype."""
    api = LatentUM.from_pretrained(untrained_model, dtype=torch.bfloat16)
    plan = entry.plan(api, fl.render(_maps(1)[0]), max_steps=2, heed_looks=False)
    assert len(plan.thoughts) == len(plan.actions) and all(t.ids.dtype == torch.long for t in plan.thoughts)
