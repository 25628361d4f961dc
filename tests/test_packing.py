"""Packing invariants: the dual sequence U ++ G, its mask, labels, routing, image slots and AIA spans."""

import numpy as np
import torch

from latentum.data.canvas import active_grid, active_index, rope_offsets
from latentum.data.packing import GEN, IGNORE, UND, block_mask, pack, same_image, subsample_rows
from latentum.data.sample import Sample
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake import tasks as vsp
from latentum.worlds.registry import default_tokenizer

TOK = default_tokenizer()


def _plan(seed=0, size=4):
    return vsp.plan_sample(np.random.default_rng(seed), size, "gymnasium", canvas=64)


def test_active_grid_reads_map_size():
    for size in range(3, 9):
        m = fl.generate_map(size, np.random.default_rng(size))
        assert active_grid(fl.render_canvas(m, canvas=64), 8) == size
    assert active_grid(np.full((64, 64, 3), 255, np.uint8)) == 8
    assert active_index(2, 8) == (0, 1, 8, 9)


def test_plan_row_layout_and_labels():
    s = _plan()
    p = pack([s], TOK, 8, max_gen_images=2)
    g = s.meta["size"]
    n_moves = len(s.meta["actions"])
    u_len = int((p.gen_mask[0] == 0).logical_and(p.valid[0]).sum())
    assert p.gen_mask[0].sum() == 2 * (g * g + 1)  # two G blocks of <img> + g*g tokens
    assert len(p.code_query) == 2 * g * g
    # Supervised text: every move, each <img> opening, "Done" and <eos>.
    targets = p.text_targets[0][p.text_targets[0] != IGNORE].tolist()
    assert targets.count(TOK.img_start_id) == n_moves
    assert TOK.decode(targets) == " ".join(s.meta["actions"] + ["Done"])
    assert targets[-1] == TOK.eos_id
    # Image slots: one input image and n_moves read-back latents, g*g tokens each.
    assert len(p.inputs.rows) == g * g and len(p.latents.rows) == n_moves * g * g
    assert (p.ids.view(-1)[p.latents.rows] == TOK.image_id).all()
    assert u_len == int(p.valid[0].sum()) - 2 * (g * g + 1)
    assert p.task.tolist() == [GEN]


def test_an_attempt_is_read_but_never_a_target():
    """A taken-back move is in the row (the model reads it) but not among the targets; its board and the
    verdict after it are."""
    s = vsp.retry_plan_sample(np.random.default_rng(1), 5, "classic", canvas=64)
    k, bad = s.meta["retry"]
    p = pack([s], TOK, 8)
    row = p.ids[0][p.valid[0]].tolist()
    row = row[row.index(TOK.img_end_id):]  # the assistant turn: after the input map (the prompt names moves)
    targets = p.text_targets[0][p.text_targets[0] != IGNORE].tolist()
    moves = [TOK.token_to_id(a) for a in fl.ACTIONS] + [TOK.token_to_id(vsp.FELL), TOK.token_to_id("Done")]
    assert [t for t in row if t in moves] == TOK.encode(" ".join(s.meta["actions"][:k] + [bad, vsp.FELL]
                                                                 + s.meta["actions"][k:] + ["Done"]))
    assert TOK.decode(targets) == " ".join(s.meta["actions"][:k] + [vsp.FELL] + s.meta["actions"][k:] + ["Done"])
    assert targets.count(TOK.img_start_id) == len(s.meta["actions"]) + 1  # the imagined fall is generated too


def test_gen_blocks_see_only_their_prefix_and_reuse_positions():
    s = _plan(1, 3)
    p = pack([s], TOK, 8, max_gen_images=3)
    mask, gen = p.attn_mask[0], p.gen_mask[0]
    first = int(gen.nonzero()[0])
    anchor = int(p.positions[0, first])  # the U index of the image's <img>
    assert p.ids[0, anchor] == TOK.img_start_id and p.ids[0, first] == TOK.img_start_id
    seen_u = mask[first, :first].nonzero().flatten()
    assert seen_u.max() == anchor - 1  # strictly before the U <img>, as after a cache fork
    assert not mask[:first, first:].any()  # U never sees G
    n = active_grid(s.assistant[1], 8) ** 2
    assert (p.positions[0, first:first + n + 1] == torch.arange(anchor, anchor + n + 1)).all()


def test_block_mask_padding_rows_see_themselves():
    block = torch.tensor([[0, 0, 1, 1, -1]])
    anchor = torch.tensor([[0, 0, 1, 1, 0]])
    m = block_mask(block, anchor)[0]
    assert m[4].tolist() == [False, False, False, False, True]
    assert m[2].tolist() == [True, False, True, False, False]
    assert m[3].tolist() == [True, False, True, True, False]


def test_understanding_rows_span_answers_and_images():
    s = vsp.hole_sample(np.random.default_rng(0), 5, "classic", canvas=64)
    p = pack([s], TOK, 8)
    assert p.task.tolist() == [UND]
    assert p.aia_query[0].sum() == (p.text_targets[0] != IGNORE).sum()
    assert p.aia_key[0].sum() == 25  # the 5x5 active image tokens


def test_prompt_dropout_pads_text_and_disables_aia():
    rng = np.random.default_rng(0)
    from latentum.worlds import shapes

    s = shapes.t2i_sample(rng, canvas=64)
    p = pack([s, s], TOK, 8, drop_prompt=[False, True])
    n_prompt = len(TOK.encode(s.user[0]))
    assert (p.ids[1, 1:1 + n_prompt] == TOK.pad_id).all()
    assert (p.ids[0, 1:1 + n_prompt] != TOK.pad_id).all()
    assert p.aia_valid.tolist() == [True, False]


def test_subsample_rows_keeps_at_most_k_of_the_span():
    mask = torch.rand(4, 50) < 0.5
    keep = subsample_rows(mask, 5, np.random.default_rng(0))
    assert (keep <= mask).all()
    assert (keep.sum(1) == mask.sum(1).clamp(max=5)).all()


def test_sample_rejects_bad_items():
    import pytest

    with pytest.raises(TypeError, match="Sample.user"):
        Sample(user=[np.zeros((4, 4), np.uint8)], assistant=["x"], task="t")


def test_gen_tokens_carry_the_cell_they_predict():
    s = _plan()
    g = s.meta["size"]
    p = pack([s], TOK, 8, max_gen_images=1)
    gen = p.gen_mask[0].nonzero().flatten()  # <img> + g*g tokens of the one G block
    # <img> predicts cell 0, token k predicts cell k + 1; the last token predicts nothing.
    assert p.gen_cells[0, gen].tolist() == list(active_index(g, 8)) + [-1]
    assert (p.gen_cells[0][~p.gen_mask[0]] == -1).all()


def test_changed_tokens_are_the_cells_a_move_touches():
    s = _plan(seed=3, size=5)
    n = len(s.meta["actions"])
    p = pack([s], TOK, 8, max_gen_images=n)
    g, pos = s.meta["size"], s.meta["positions"]  # positions: the player's cell before each move and after
    changed = p.code_changed.view(n, g * g)
    for k in range(n):  # board k+1 differs from board k exactly where the player left and arrived
        (r0, c0), (r1, c1) = pos[k], pos[k + 1]
        assert torch.nonzero(changed[k]).flatten().tolist() == sorted({r0 * g + c0, r1 * g + c1})
    t2i = pack([vsp.describe_sample(np.random.default_rng(0), 3, "gymnasium", canvas=64)], TOK, 8)
    assert len(t2i.code_changed) == 0


def test_rope_offsets_put_each_image_cell_at_its_2d_position():
    """Image token (r, c) after position p sits at (p + r, p + c) in U and in its G block; text at (t, t)."""
    s = vsp.plan_sample(np.random.default_rng(1), 3, "classic", canvas=64)
    p = pack([s], TOK, 8, max_gen_images=1)
    pos2 = p.positions[..., None] + p.rope_offsets  # (1, T, 2)
    image = p.ids[0] == TOK.image_id
    assert (p.rope_offsets[0][~image] == 0).all()
    starts = [t for t in range(1, p.ids.size(1)) if image[t] and not image[t - 1]]
    assert len(starts) == 1 + len(s.meta["actions"]) + 1  # map, thoughts, one G block
    for t in starts:
        grid = pos2[0, t:t + 9] - pos2[0, t]  # (9, 2): a 3x3 map
        assert grid.tolist() == [[r, c] for r in range(3) for c in range(3)]
    assert rope_offsets(3)[4] == (1 - 4, 1 - 4)


def test_image_spans_cover_only_the_images_the_und_branch_reads():
    s = vsp.plan_sample(np.random.default_rng(0), 3, "classic", canvas=64)
    p = pack([s], TOK, 8, max_gen_images=1)
    span = p.image_span[0]
    n_images = 1 + len(s.meta["actions"])  # the map + one thought per move
    assert sorted(set(span.tolist()) - {-1}) == list(range(n_images))
    assert ((span >= 0) == ((p.ids[0] == TOK.image_id) & ~p.gen_mask[0])).all()  # G blocks get no span
    same = same_image(p.image_span)[0]
    first = int((span == 0).nonzero()[0])
    assert same[first, first + 8] and not same[first, first + 9]  # the 3x3 map's 9 tokens, then </img>


def test_a_latent_view_question_reads_its_image_as_latents_and_generates_nothing():
    """A question about a LatentView image (how a thought is read back): the same tokens and targets as the
    continuous question, the image in the latent slots instead of the input slots, and no G block."""
    from latentum.data.sample import LatentView
    from latentum.train.data import as_latent_question

    s = vsp.player_sample(np.random.default_rng(3), 5, "classic", canvas=64)
    plain, latent = pack([s], TOK, 8), pack([as_latent_question(s)], TOK, 8)
    assert isinstance(as_latent_question(s).user[0], LatentView)
    assert torch.equal(plain.ids, latent.ids) and torch.equal(plain.text_targets, latent.text_targets)
    assert torch.equal(plain.inputs.rows, latent.latents.rows) and len(latent.inputs.rows) == 0
    assert not latent.gen_mask.any() and len(latent.code_query) == 0 and latent.task.tolist() == [UND]
    assert np.array_equal(latent.latents.pixels, plain.inputs.pixels)
    assert torch.equal(latent.image_span, plain.image_span)
    plan = _plan()
    assert as_latent_question(plan) is plan  # samples that generate images keep their continuous input


def test_written_coordinates_name_their_cell_from_the_column_number_on():
    from latentum.data.canvas import named_cells

    s = vsp.hole_sample(np.random.default_rng(7), 6, "gymnasium", canvas=64)
    r, c = s.meta["cell"]
    p = pack([s], TOK, 8)
    at = (p.text_cells[0] >= 0).nonzero().flatten().tolist()
    assert len(at) == 2 and (p.text_cells[0, at] == r * 8 + c).all()  # C and the "?" that predicts the answer
    assert [TOK.id_to_token(int(p.ids[0, k])) for k in at] == [str(c + 1), "?"]
    ids = TOK.encode("row 9 column 1 row 2 column 8 , row 3 ? column 2 row 1 column 1")
    want = [-1] * 7 + [1 * 8 + 7] * 10 + [0]  # 9 is no word; "? column" no pair; a later cell takes over
    assert named_cells(ids, TOK, 8) == want
    answer = pack([vsp.player_sample(np.random.default_rng(1), 4, "classic", canvas=64)], TOK, 8)
    assert (answer.text_cells < 0).all()  # the assistant's own coordinates are not grounded


def test_a_reasoned_image_is_generated_after_its_supervised_plan():
    from latentum.worlds import shapes

    s = shapes.t2i_reason_sample(np.random.default_rng(4), canvas=64)
    p = pack([s], TOK, 8, max_gen_images=1)
    targets = p.text_targets[0][p.text_targets[0] != IGNORE].tolist()
    plan = TOK.encode(s.assistant[0])
    assert targets == plan + [TOK.img_start_id, TOK.eos_id]  # the plan, then the image opens, then the end
    assert len(p.code_query) == 8 * 8 and p.task.tolist() == [GEN]
