"""Decoding invariants on a tiny random model: training's dual sequence equals inference's fork, fork+replay
equals a fresh prefill, batching with left padding changes nothing, and samplers are seeded."""

import copy

import numpy as np
import pytest
import torch

from latentum.api import LatentImage, LatentUM
from latentum.apps.vsp import entry
from latentum.data.canvas import active_grid, active_index, rope_offsets
from latentum.data.packing import pack
from latentum.data.sample import Sample
from latentum.generation.engine import Decoder
from latentum.generation.sampling import sample_logits
from latentum.model.cache import KVCache
from latentum.model.latentum import LatentUMModel
from latentum.train.config import load_recipe
from latentum.types import GREEDY, SamplingParams
from latentum.worlds.frozenlake import tasks as vsp
from latentum.worlds.registry import default_tokenizer

TOK = default_tokenizer()


@pytest.fixture(scope="module", params=[("1d", "causal"), ("2d", "causal"), ("2d", "bidirectional")])
def model(request):
    """Every invariant holds for both image RoPE layouts (BackboneConfig.image_rope) and with images read
    bidirectionally (BackboneConfig.image_attention)."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(load_recipe("configs/recipes/debug.yaml").model)
    cfg.backbone.vocab_size = TOK.vocab_size
    cfg.backbone.image_rope, cfg.backbone.image_attention = request.param
    m = LatentUMModel(cfg).eval()
    # Make the branches differ so routing mistakes show up.
    with torch.no_grad():
        for p in m.backbone.branch_parameters("gen"):
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def sample():
    return vsp.plan_sample(np.random.default_rng(3), 3, "classic", canvas=64)


def _feed_until_first_thought(dec: Decoder, s):
    """Prefill the user turn, then the first move token (the next token would be <img>)."""
    dec.prefill([s.user])
    dec.feed_ids(torch.tensor([TOK.encode(s.assistant[0])]))


def _one_move_sample():
    for seed in range(1000):
        s = vsp.plan_sample(np.random.default_rng(seed), 3, "classic", canvas=64)
        if len(s.meta["actions"]) == 1:
            return s
    raise AssertionError("no one-move map found")


@torch.no_grad()
def test_training_gen_block_equals_inference_fork(model):
    s = _one_move_sample()  # U: prompt, map, move, thought, Done; one G block for the thought
    p = pack([s], TOK, 8)
    fwd = model.forward_packed(p)
    gen_rows = p.gen_mask[0].nonzero().flatten()  # <img> + n latent tokens
    g = active_grid(s.assistant[1], 8)
    act = fwd.latent_ids[0][list(active_index(g, 8))]  # (n, G)
    dec = Decoder(model, TOK, 1, 512)
    _feed_until_first_thought(dec, s)
    cells = torch.tensor(active_index(g, 8))  # each gen input carries the cell it predicts
    h0 = dec.feed(dec._token_embeddings([TOK.img_start_id], 1)[0] + model.cell_pos(cells[:1]), gen=True)
    offsets = torch.tensor(rope_offsets(g))[:-1]  # token i carries cell i's code and sits at cell i
    h1 = dec.feed(model.latent_embeddings(act[None, :-1], cells[1:]), gen=True, offsets=offsets)
    infer = torch.cat([h0, h1], dim=1)[0]  # (n, D)
    train = fwd.hidden[0, gen_rows[:-1]]
    torch.testing.assert_close(infer, train, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_think_fork_and_replay_equals_fresh_prefill(model, sample):
    params = SamplingParams(temperature=1.0)
    a = Decoder(model, TOK, 1, 512)
    _feed_until_first_thought(a, sample)
    ids = a.think(params, torch.Generator().manual_seed(0), grid=3)
    b = Decoder(model, TOK, 1, 512)
    _feed_until_first_thought(b, sample)
    b.feed_latents(ids)
    assert a.cache.length == b.cache.length
    L = a.cache.length
    torch.testing.assert_close(a.cache.k[:, :, :, :L], b.cache.k[:, :, :, :L])
    torch.testing.assert_close(a.cache.v[:, :, :, :L], b.cache.v[:, :, :, :L])
    torch.testing.assert_close(a.text_logits(), b.text_logits())


@torch.no_grad()
def test_cached_decoding_equals_one_forward(model, sample):
    p = pack([vsp.hole_sample(np.random.default_rng(0), 4, "gymnasium", canvas=64)], TOK, 8)
    full = model.forward_packed(p).hidden[0]
    dec = Decoder(model, TOK, 1, 512)
    s = vsp.hole_sample(np.random.default_rng(0), 4, "gymnasium", canvas=64)
    dec.prefill([s.user])
    n = dec.cache.length
    torch.testing.assert_close(dec.last[0], full[n - 1], atol=2e-5, rtol=1e-4)
    for t in p.ids[0, n:int(p.valid[0].sum())]:
        dec.feed_ids(t.view(1, 1))
        n += 1
        torch.testing.assert_close(dec.last[0], full[n - 1], atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("latent", [False, True])
def test_a_grounded_question_reads_the_same_in_training_and_inference(model, latent):
    """With ground_coordinates the hole question's column number and the "?" after it carry their cell's
    embedding in the packed forward and in the prefill alike (and the hidden states differ from the ungrounded
    ones); a LatentView question (training) equals feeding the latents and then the question
    (``answer_latents``)."""
    from latentum.train.data import as_latent_question

    s = vsp.hole_sample(np.random.default_rng(4), 5, "classic", canvas=64)
    s = as_latent_question(s) if latent else s
    grounded = copy.deepcopy(model)
    grounded.cfg.ground_coordinates = True
    p = pack([s], TOK, 8)
    assert (p.text_cells >= 0).sum() == 2
    full = grounded.forward_packed(p).hidden[0]
    dec = Decoder(grounded, TOK, 1, 512)
    if latent:
        dec.feed_ids(torch.tensor([[TOK.bos_id]]))
        dec.feed_latents(grounded.image_ids(s.user[0][None])[:, list(active_index(5, 8))])
        dec.feed_prompt_ids(torch.tensor([TOK.encode(s.user[1])]))
    else:
        dec.prefill([s.user])
    n = dec.cache.length
    torch.testing.assert_close(dec.last[0], full[n - 1], atol=2e-5, rtol=1e-4)
    plain = model.forward_packed(p).hidden[0]
    assert not torch.allclose(plain[n - 1], full[n - 1])


@torch.no_grad()
def test_a_named_cell_ends_with_its_text_in_training_and_inference(model):
    """A question before its image: the cell it names stays on the question's own tokens (not the image's
    framing tokens after it) in the prefill, as in packing, so the two forwards agree."""
    s = vsp.hole_sample(np.random.default_rng(4), 5, "classic", canvas=64)
    s = Sample([s.user[1], s.user[0]], s.assistant, s.task, s.meta)
    grounded = copy.deepcopy(model)
    grounded.cfg.ground_coordinates = True
    full = grounded.forward_packed(pack([s], TOK, 8)).hidden[0]
    dec = Decoder(grounded, TOK, 1, 512)
    dec.prefill([s.user])
    torch.testing.assert_close(dec.last[0], full[dec.cache.length - 1], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_left_padded_batch_equals_single_rows(model):
    api = LatentUM(model, TOK)
    prompts = ["a red circle", "two squares and a blue triangle"]
    both = api.generate_images(prompts, cfg_scale=2.0, temperature=0.0)
    for prompt, latent in zip(prompts, both):
        single = api.generate_images([prompt], cfg_scale=2.0, temperature=0.0)[0]
        assert torch.equal(single.ids, latent.ids)


def test_sampling_is_seeded_and_filters():
    logits = torch.randn(64, 50)
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.9)
    a = sample_logits(logits, params, torch.Generator().manual_seed(1))
    b = sample_logits(logits, params, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, None]).any(-1).all()
    assert torch.equal(sample_logits(logits, GREEDY), logits.argmax(-1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


@torch.no_grad()
def test_plan_and_generate_return_well_formed_results(model):
    api = LatentUM(model, TOK)
    from latentum.worlds import frozenlake as fl

    m = fl.generate_map(4, np.random.default_rng(0))
    plan = entry.plan(api, fl.render(m, style="classic"), max_steps=3, sampling=SamplingParams(1.0), seed=0)
    assert len(plan.actions) <= 3 and set(plan.actions) <= set("LDRU")
    assert all(isinstance(t, LatentImage) and t.ids.shape == (16, 2) for t in plan.thoughts)
    out = api.generate(["Plan a safe path", fl.render(m)], max_images=1, max_new_tokens=4)
    assert all(isinstance(x, (str, LatentImage)) for x in out)
    assert isinstance(api.answer(fl.render(m), "Where is the player ?"), str)


@torch.no_grad()
def test_visual_projector_starts_as_the_mbaq_up_projection(model, sample):
    """Stage 2 starts the projector as MBAQ's up-projection: a latent read by the und branch then embeds
    exactly as the quantized features of the same image did in stage 1 (what MBAQ aligned)."""
    m = copy.deepcopy(model)
    canvas = sample.user[1][None]
    g = active_grid(canvas[0], m.cfg.encoder.grid)
    index = torch.tensor(active_index(g, m.cfg.encoder.grid))
    ids = m.image_ids(canvas)[:, index]
    stage1 = (m.quantizer.project(m.quantizer.encode(m.image_features(canvas)).codes)
              + m.canvas_positions())[:, index]
    assert not torch.allclose(m.latent_embeddings(ids), stage1)
    m.init_visual_projector()
    torch.testing.assert_close(m.latent_embeddings(ids), stage1)


@torch.no_grad()
def test_image_attention_decides_whether_a_cell_sees_later_cells(model, sample):
    """Changing only the last cell of a read image changes its first cell's hidden state exactly when images
    are read bidirectionally; the text before the image never changes (no look-ahead past the image)."""
    model = copy.deepcopy(model)
    for name, p in model.backbone.named_parameters():
        if name.endswith("q_norm.weight"):
            p.zero_()  # uniform attention over whatever a query may see, so every visible key shows up
    g = active_grid(sample.assistant[1], 8)
    ids = model.image_ids(sample.assistant[1][None])[:, list(active_index(g, 8))]
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % model.cfg.quantizer.codebook_size
    hidden = []
    for x in (ids, other):
        dec = Decoder(model, TOK, 1, 512)
        _feed_until_first_thought(dec, sample)
        before = dec.last.clone()
        hidden.append((before, dec.feed_latents(x)[0]))
    (before_a, a), (before_b, b) = hidden
    assert torch.equal(before_a, before_b)
    first_cell_same = torch.allclose(a[1], b[1])  # a[0] is <img>
    assert first_cell_same == (model.cfg.backbone.image_attention == "causal")
    torch.testing.assert_close(a[0], b[0])


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 3, None])
def test_a_drafted_image_equals_token_by_token_greedy_decoding(model, window):
    """Checking a draft several tokens per forward gives the greedy image exactly, whatever the draft (all
    right, partly right, random), and leaves each row the keys one token per step leaves it (rows check their
    drafts on their own: a row's rejected guesses are holes in the cache, gone once it is compacted)."""
    s = vsp.plan_sample(np.random.default_rng(5), 4, "classic", canvas=64)
    two = [s.user, vsp.plan_sample(np.random.default_rng(6), 4, "gymnasium", canvas=64).user]

    def fresh():
        dec = Decoder(model, TOK, 2, 1024)
        dec.prefill(two)
        dec.feed_ids(torch.tensor([TOK.encode("R")] * 2))
        return dec

    ref = fresh()
    want = ref.generate_latent(GREEDY, grid=4)  # (2, 16, G)
    K = model.head.codebook_size
    partly = want.clone()
    partly[0, 5], partly[1, 9] = (partly[0, 5] + 1) % K, (partly[1, 9] + 1) % K
    for draft in (want, partly, torch.randint(0, K, want.shape, generator=torch.Generator().manual_seed(0))):
        dec = fresh()
        assert torch.equal(dec.generate_latent(GREEDY, grid=4, draft=draft, window=window), want)
        assert torch.equal(dec.next_pos, ref.next_pos)
        dec.cache.compact()
        ref.cache.compact()
        assert dec.cache.length == ref.cache.length and torch.equal(dec.cache.valid(), ref.cache.valid())
        L = ref.cache.length
        torch.testing.assert_close(dec.cache.k[:, :, :, :L], ref.cache.k[:, :, :, :L])


@torch.no_grad()
def test_a_right_draft_takes_one_forward_and_sampling_refuses_drafts(model):
    s = vsp.plan_sample(np.random.default_rng(5), 4, "classic", canvas=64)
    dec = Decoder(model, TOK, 1, 1024)
    dec.prefill([s.user])
    mark, pos = dec.cache.length, dec.next_pos.clone()
    want = dec.generate_latent(GREEDY, grid=4)
    dec.cache.truncate(mark)
    dec.next_pos = pos
    calls = []
    feed = dec.feed
    dec.feed = lambda *a, **k: calls.append(1) or feed(*a, **k)
    assert torch.equal(dec.generate_latent(GREEDY, grid=4, draft=want), want)
    assert len(calls) == 1  # <img> and the whole draft in one forward
    with pytest.raises(ValueError, match="draft"):
        dec.generate_latent(SamplingParams(temperature=1.0), grid=4, draft=want)
    with pytest.raises(ValueError, match="draft must be"):
        dec.generate_latent(GREEDY, grid=4, draft=want[:, :3])


def _scripted_text(monkeypatch, script: list[int]):
    """Make ``Decoder.sample_text`` say ``script`` in order (drawing nothing from the generator)."""
    said = iter(script)
    monkeypatch.setattr(Decoder, "sample_text", lambda self, *a, **k: torch.tensor([next(said)] * self.batch))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_an_interleaved_image_is_guided_as_text_to_image_guides_it(model, monkeypatch, cfg_scale):
    """generate(..., cfg_scale) guides each image against the prompt-dropped stream: an image started right
    after the prompt equals ``generate_images`` of that prompt at the same scale and seed, and the stream
    continues after it (both streams took the image)."""
    api = LatentUM(model, TOK)
    prompt, sampling = "a red circle left of a blue square", SamplingParams(0.9, 50, 0.95)
    want = api.generate_images([prompt], cfg_scale=cfg_scale, seed=3, temperature=0.9, top_k=50, top_p=0.95)[0]
    _scripted_text(monkeypatch, [TOK.img_start_id, TOK.token_to_id("circle"), TOK.img_start_id, TOK.eos_id])
    out = api.generate([prompt], max_images=2, sampling=sampling, seed=3, cfg_scale=cfg_scale)
    assert [type(x).__name__ for x in out] == ["LatentImage", "str", "LatentImage"]
    assert torch.equal(out[0].ids, want.ids)


def test_interleaved_guidance_changes_the_images(model, monkeypatch):
    api = LatentUM(model, TOK)
    script = [TOK.img_start_id, TOK.eos_id]
    images = []
    for scale in (1.0, 4.0):
        _scripted_text(monkeypatch, script)
        images.append(api.generate(["two blue squares"], sampling=SamplingParams(0.0), seed=0, cfg_scale=scale)[0])
    assert not torch.equal(images[0].ids, images[1].ids)
    with pytest.raises(ValueError, match="cfg_scale"):
        api.generate(["two blue squares"], cfg_scale=float("nan"))


def _script_by_prompt(monkeypatch, scripts: dict[str, list[int]]) -> list[int]:
    """Make every decoder row say the script of the prompt it holds (its first text that is a key of ``scripts``),
    then <eos>, following rows through ``prefill``, ``replace_rows`` and ``keep_rows``. -> the batch size of each
    ``sample_text`` call, as it happens."""
    prefill, replace, keep = Decoder.prefill, Decoder.replace_rows, Decoder.keep_rows
    sizes = []

    def script(items):
        return iter(scripts[next(x for x in items if isinstance(x, str) and x in scripts)] + [TOK.eos_id] * 64)

    def new_prefill(self, prompts, drop_text=False):
        self.script = [script(p) for p in prompts]
        return prefill(self, prompts, drop_text)

    def new_replace(self, index, prompts, drop_text=False):
        for i, p in zip(index.tolist(), prompts):
            self.script[i] = script(p)
        return replace(self, index, prompts, drop_text)

    def new_keep(self, index):
        self.script = [self.script[i] for i in index.tolist()]
        return keep(self, index)

    def said(self, *a, **k):
        sizes.append(self.batch)
        return torch.tensor([next(s) for s in self.script])

    for name, fn in (("prefill", new_prefill), ("replace_rows", new_replace), ("keep_rows", new_keep),
                     ("sample_text", said)):
        monkeypatch.setattr(Decoder, name, fn)
    return sizes


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("batch", [2, 16])
def test_a_batch_of_interleaved_prompts_equals_each_alone(model, monkeypatch, cfg_scale, batch):
    """generate on a batch (rows of different lengths and image layouts, one holding a latent image, images at
    different steps, a row that ends at once), continuously batched: with 2 rows for 4 prompts, ended rows restart
    on waiting prompts and leave when none wait. Each row's text and greedy images equal the row decoded alone; a
    row's image is read back by that row only."""
    api = LatentUM(model, TOK)
    board = vsp.plan_sample(np.random.default_rng(3), 3, "classic", canvas=64).user[1]
    prompts = [["a red circle left of a blue square"], [vsp.PLAN_PROMPT, api.image_latent(board), "R"],
               ["two blue squares"], [vsp.PLAN_PROMPT, board, "D"]]
    w = TOK.token_to_id
    scripts = {"a red circle left of a blue square": [TOK.img_start_id, w("circle"), TOK.img_start_id, TOK.eos_id],
               "R": [w("R"), w("D"), TOK.img_start_id, w("R"), TOK.img_start_id, TOK.eos_id],
               "two blue squares": [TOK.eos_id],
               "D": [w("L"), TOK.img_start_id, w("U")]}
    sizes = _script_by_prompt(monkeypatch, scripts)
    both = api.generate(prompts, max_images=4, sampling=GREEDY, cfg_scale=cfg_scale, batch=batch)
    assert [[type(x).__name__ for x in row] for row in both] == [
        ["LatentImage", "str", "LatentImage"], ["str", "LatentImage", "str", "LatentImage"], [],
        ["str", "LatentImage", "str"]]
    assert both[3][1].ids.shape[0] == 9  # the 3x3 input's layout; the others imagine the whole canvas
    assert max(sizes) == min(batch, 4) and sizes[-1] == 1
    for prompt, row in zip(prompts, both):
        alone = api.generate(prompt, max_images=4, sampling=GREEDY, cfg_scale=cfg_scale)
        assert len(alone) == len(row)
        for a, b in zip(alone, row):
            assert (torch.equal(a.ids, b.ids) if isinstance(a, LatentImage) else a == b)


def test_rows_that_each_fit_alone_fit_together(model, monkeypatch):
    """Every row's cache holds the image steps of every row (masked where not its own) until compacted: rows that
    each fit the model's length alone are decoded together within it, each equal to itself alone."""
    small = copy.deepcopy(model)
    api = LatentUM(small, TOK)
    image = small.cfg.encoder.grid ** 2 + 2
    texts = ["a red circle", "two blue squares", "a green triangle", "three circles", "a red square"]
    longest = max(len(TOK.encode(t)) for t in texts) + 1 + 8 + image
    small.cfg.backbone.max_seq_len = longest + 2 * image  # one row of two images, and room for a third
    circle = TOK.token_to_id("circle")
    scripts = {t: [circle] * k + [TOK.img_start_id, circle, TOK.img_start_id] for k, t in enumerate(texts)}
    sizes = _script_by_prompt(monkeypatch, scripts)  # each row thinks at its own steps
    compactions = []
    compact = KVCache.compact
    monkeypatch.setattr(KVCache, "compact", lambda self: compactions.append(1) or compact(self))
    out = api.generate([[t] for t in texts], max_images=2, max_new_tokens=8, sampling=GREEDY, batch=4)
    assert max(sizes) == 4 and compactions
    for text, row in zip(texts, out):
        alone = api.generate([text], max_images=2, max_new_tokens=8, sampling=GREEDY)
        assert [type(x).__name__ for x in row][-3:] == ["LatentImage", "str", "LatentImage"]
        assert all(torch.equal(a.ids, b.ids) if isinstance(a, LatentImage) else a == b for a, b in zip(alone, row))


def _decoders(model, prompts, tokens):
    """A decoder of every prompt, plus one per prompt; each fed the same ``tokens`` after its prompt."""
    together = Decoder(model, TOK, len(prompts), 1024)
    together.prefill(prompts)
    alone = []
    for p in prompts:
        d = Decoder(model, TOK, 1, 1024)
        d.prefill([p])
        alone.append(d)
    for d in (together, *alone):
        d.feed_ids(torch.tensor([TOK.encode(tokens)] * d.batch))
    return together, alone


@torch.no_grad()
@pytest.mark.parametrize("drafted", [False, True])
def test_rows_imagine_images_of_their_own_grids_as_each_would_alone(model, drafted):
    """``grid`` per row: each row's image (then PAD_CODE) equals what the row generates alone, token by token or
    checked against a draft, and after reading the images back every row's next logits equal its own."""
    from latentum.generation.engine import PAD_CODE

    samples = [vsp.plan_sample(np.random.default_rng(seed), g, "classic", canvas=64) for seed, g in
               ((5, 4), (6, 3), (7, 5))]
    grids = [4, 3, 5]
    together, alone = _decoders(model, [s.user for s in samples], "R")
    want = [d.think(GREEDY, grid=g) for d, g in zip(alone, grids)]  # (1, g * g, G) each
    draft = None
    if drafted:  # each row's own image, one token wrong
        draft = torch.full((3, 25, model.head.codebooks), PAD_CODE)
        for b, w in enumerate(want):
            draft[b, :w.size(1)] = w[0]
            draft[b, 1] = (draft[b, 1] + 1) % model.head.codebook_size
    ids = together.think(GREEDY, grid=grids, draft=draft)
    for b, (w, g) in enumerate(zip(want, grids)):
        assert torch.equal(ids[b, :g * g], w[0]) and bool((ids[b, g * g:] == PAD_CODE).all())
    logits = together.text_logits()
    for b, d in enumerate(alone):
        torch.testing.assert_close(logits[b], d.text_logits()[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_rows_left_out_of_a_thought_take_no_image_and_are_unchanged(model):
    samples = [vsp.plan_sample(np.random.default_rng(seed), 4, "classic", canvas=64) for seed in (5, 6)]
    together, alone = _decoders(model, [s.user for s in samples], "R")
    before = together.text_logits()[1]
    ids = together.think(GREEDY, grid=4, rows=torch.tensor([True, False]))
    assert torch.equal(ids[0], alone[0].think(GREEDY, grid=4)[0]) and bool((ids[1] < 0).all())
    torch.testing.assert_close(together.text_logits()[1], before)


@torch.no_grad()
def test_a_replaced_row_continues_as_a_fresh_decoder_and_the_others_are_untouched(model):
    """``replace_rows`` mid-stream (continuous batching): the new row equals its prompt decoded alone, the row
    beside it goes on as it would have, and compacting the cache changes nothing."""
    s = [vsp.plan_sample(np.random.default_rng(seed), g, "classic", canvas=64) for seed, g in ((5, 4), (6, 3), (8, 5))]
    together, alone = _decoders(model, [s[0].user, s[1].user], "R")
    together.think(GREEDY, grid=[4, 3])
    alone[1].think(GREEDY, grid=3)
    together.replace_rows(torch.tensor([0]), [s[2].user])
    fresh = Decoder(model, TOK, 1, 1024)
    fresh.prefill([s[2].user])
    for step in ("D", "R"):
        for d in (together, fresh, alone[1]):
            d.feed_ids(torch.tensor([TOK.encode(step)] * d.batch))
        got = [together.think(GREEDY, grid=[5, 3]), fresh.think(GREEDY, grid=5), alone[1].think(GREEDY, grid=3)]
        assert torch.equal(got[0][0, :25], got[1][0]) and torch.equal(got[0][1, :9], got[2][0])
    logits = together.text_logits()
    together.cache.compact()
    torch.testing.assert_close(together.text_logits(), logits)
    together.feed_ids(torch.tensor([TOK.encode("Done")] * 2))
    for d in (fresh, alone[1]):
        d.feed_ids(torch.tensor([TOK.encode("Done")]))
    torch.testing.assert_close(together.text_logits()[0], fresh.text_logits()[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.text_logits()[1], alone[1].text_logits()[0], atol=1e-5, rtol=1e-4)


def test_bad_row_grids_are_refused(model):
    dec = Decoder(model, TOK, 2, 64)
    dec.prefill([["go"], ["go"]])
    with pytest.raises(ValueError, match="grid must be"):
        dec.generate_latent(GREEDY, grid=[3])
    with pytest.raises(ValueError, match="grid must be"):
        dec.generate_latent(GREEDY, grid=[3, 9])
