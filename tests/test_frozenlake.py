"""FrozenLake world: generator statistics, BFS optimality, gym/strict scoring, render == real env, oracle."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake import ACTIONS, STYLES, LakeMap

LAST_ACTIONS = [None, *ACTIONS]


def random_case(rng):
    """A random map, a random player cell (holes and goal included) and a random last action."""
    m = fl.generate_map(int(rng.integers(3, 9)), rng)
    player = (int(rng.integers(m.size)), int(rng.integers(m.size)))
    return m, player, LAST_ACTIONS[rng.integers(len(LAST_ACTIONS))]


def walk_gym(m, actions):
    """Independent re-statement of the gym rules for brute force: (reached goal, fell in a hole)."""
    pos = m.player
    for a in actions:
        pos = fl.move(m, pos, a)
        if pos in m.holes:
            return False, True
        if pos == m.goal:
            return True, False
    return False, False


# ------------------------------------------------------------------------------------------ generator


def test_generator_statistics():
    rng = np.random.default_rng(0)
    maps = [fl.generate_map(8, rng) for _ in range(300)]
    frac = np.mean([len(m.holes) / 64 for m in maps])
    assert 0.17 < frac < 0.22, frac  # Bernoulli(0.2), slightly thinned by the solvability rejection
    for m in maps:
        assert m.player != m.goal and m.player not in m.holes and m.goal not in m.holes
        assert fl.shortest_plan(m) is not None
    # player and goal are anywhere (VSP), not pinned to corners as in gym's generate_random_map
    assert len({m.player for m in maps}) > 40 and len({m.goal for m in maps}) > 40


@pytest.mark.parametrize("size", range(3, 9))
def test_generator_sizes_and_seeding(size):
    a = [fl.generate_map(size, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1] and a[0].size == size
    b = [fl.generate_map(size, np.random.default_rng(s)) for s in range(20)]
    assert len({(m.holes, m.player, m.goal) for m in b}) > 10


@pytest.mark.parametrize("bad", [2, 9, 3.0, "4"])
def test_generator_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="size"):
        fl.generate_map(bad, np.random.default_rng(0))


def test_lakemap_text_forms_round_trip():
    m = LakeMap.from_desc(["SFH", "FFG", "FHF"])
    assert m.player == (0, 0) and m.goal == (1, 2) and m.holes == {(0, 2), (2, 1)}
    assert m.desc() == ["SFH", "FFG", "FHF"]
    assert m.text_grid() == "S F H / F F G / F H F"
    with pytest.raises(ValueError, match="goal"):
        LakeMap(3, frozenset(), (0, 0), (0, 0))
    with pytest.raises(ValueError, match="holes"):
        LakeMap(3, frozenset({(3, 0)}), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="exactly one S"):
        LakeMap.from_desc(["SFH", "FSG", "FHF"])


# ------------------------------------------------------------------------------------------ planning


def brute_force_length(m, max_len=10):
    for k in range(max_len + 1):
        if any(walk_gym(m, seq)[0] for seq in itertools.product(ACTIONS, repeat=k)):
            return k
    return None


def test_bfs_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(25):
        m = fl.generate_map(int(rng.integers(3, 5)), rng, hole_prob=0.3)
        plan = fl.shortest_plan(m)
        assert len(plan) == brute_force_length(m)
        assert fl.simulate(m, plan, "gym").success and fl.simulate(m, plan, "strict").success


def test_bfs_unreachable_and_deterministic():
    walled = LakeMap.from_desc(["SFH", "FHF", "HFG"])
    assert fl.shortest_plan(walled) is None
    m = LakeMap.from_desc(["SFF", "FFF", "FFG"])
    assert fl.shortest_plan(m) == ["D", "D", "R", "R"]  # ties broken by L, D, R, U order
    assert fl.shortest_plan(m, start=(2, 1)) == ["R"]


def test_move_off_grid_is_noop():
    m = LakeMap.from_desc(["SFF", "FFF", "FFG"])
    assert fl.move(m, (0, 0), "L") == (0, 0) and fl.move(m, (0, 0), "U") == (0, 0)
    assert fl.move(m, (0, 0), "R") == (0, 1) and fl.move(m, (0, 0), "D") == (1, 0)
    with pytest.raises(ValueError, match="action"):
        fl.move(m, (0, 0), "X")


# ------------------------------------------------------------------------------------------ scoring

CRAFTED = LakeMap.from_desc(["SFF", "FHF", "FFG"])


@pytest.mark.parametrize("actions, gym, strict", [
    ("R R D D", (True, "goal"), (True, "goal")),
    ("U R R D D", (True, "goal"), (False, "off_grid")),  # off-grid: no-op for gym, failure for ThinkMorph
    ("R R D D U", (True, "goal"), (False, "overshoot")),  # gym stops at the goal; strict needs it last
    ("D R R D", (False, "hole"), (False, "hole")),
    ("R", (False, "not_at_goal"), (False, "not_at_goal")),
    ("", (False, "not_at_goal"), (False, "not_at_goal")),
])
def test_simulate_rules_on_crafted_cases(actions, gym, strict):
    actions = actions.split()
    g, s = fl.simulate(CRAFTED, actions, "gym"), fl.simulate(CRAFTED, actions, "strict")
    assert (g.success, g.reason) == gym and (s.success, s.reason) == strict
    assert g.positions[0] == s.positions[0] == CRAFTED.player


def test_simulate_gym_env_matches_rules_on_random_sequences():
    rng = np.random.default_rng(2)
    for _ in range(60):
        m = fl.generate_map(int(rng.integers(3, 9)), rng)
        seq = [ACTIONS[i] for i in rng.integers(0, 4, size=int(rng.integers(0, 12)))]
        r = fl.simulate(m, seq, "gym")
        goal, hole = walk_gym(m, seq)
        assert r.success == goal and (r.reason == "hole") == hole
        assert r.positions[-1] == (m.goal if goal else r.positions[-1])
        assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) <= 1 for a, b in zip(r.positions, r.positions[1:]))


def test_simulate_rejects_bad_input():
    with pytest.raises(ValueError, match=r"actions\[1\]"):
        fl.simulate(CRAFTED, ["R", "up"])
    with pytest.raises(ValueError, match="rule"):
        fl.simulate(CRAFTED, ["R"], rule="vsp")


# ------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("style", STYLES)
def test_fast_render_equals_real_env(style):
    rng = np.random.default_rng(3)
    cases = [random_case(rng) for _ in range(30)]
    m = LakeMap.from_desc(["SFH", "FFG", "FHF"])
    cases += [(m, p, a) for p in [(0, 0), (0, 2), (1, 2), (2, 2)] for a in LAST_ACTIONS]  # S, H, G, F
    for m, player, last in cases:
        fast = fl.render(m, player, style, last)
        assert fast.dtype == np.uint8 and fast.shape == (64 * m.size, 64 * m.size, 3)
        np.testing.assert_array_equal(fast, fl.render_env(m, player, style, last))


@pytest.mark.parametrize("style", STYLES)
def test_render_shows_player_orientation_and_position(style):
    m = LakeMap.from_desc(["SFF", "FFF", "FFG"])
    imgs = {a: fl.render(m, (1, 1), style, a) for a in ACTIONS}
    assert not np.array_equal(fl.render(m, (1, 1), style), fl.render(m, (0, 1), style))
    if style == "classic":  # the elf faces its last move
        assert len({im.tobytes() for im in imgs.values()}) == 4


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("canvas, grid", [(128, 8), (64, 8), (96, 8)])
def test_render_canvas_equals_to_canvas_of_env_render(style, canvas, grid):
    rng = np.random.default_rng(4)
    for _ in range(4):
        m, player, last = random_case(rng)
        out = fl.render_canvas(m, player, style, last, canvas=canvas, grid=grid)
        ref, n = fl.to_canvas(fl.render_env(m, player, style, last), canvas=canvas, grid=grid)
        assert n == m.size and out.shape == (canvas, canvas, 3)
        np.testing.assert_array_equal(out, ref)
        side = m.size * canvas // grid
        assert out[side:].max(initial=0) == 0 and out[:, side:].max(initial=0) == 0  # black padding
        assert out[:side, :side].mean() > 50


def test_to_canvas_input_forms_and_errors():
    img = fl.render_env(CRAFTED, None, "classic")
    ref, _ = fl.to_canvas(img)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(fl.to_canvas(rgba)[0], ref)
    np.testing.assert_array_equal(fl.to_canvas(Image.fromarray(img))[0], ref)
    small = np.asarray(Image.fromarray(img).resize((96, 96)))
    assert fl.to_canvas(small, size=3)[1] == 3
    with pytest.raises(ValueError, match=r"image is not a FrozenLake map.*64\*N.*got 500x300"):
        fl.to_canvas(np.zeros((300, 500, 3), np.uint8))
    with pytest.raises(ValueError, match="N in 3..8"):
        fl.to_canvas(np.zeros((64 * 9, 64 * 9, 3), np.uint8))
    with pytest.raises(ValueError, match="image must be a uint8"):
        fl.to_canvas(img.astype(np.float32))
    with pytest.raises(ValueError, match="canvas"):
        fl.to_canvas(img, canvas=100)
    with pytest.raises(ValueError, match="does not fit"):
        fl.to_canvas(fl.render_env(fl.generate_map(8, np.random.default_rng(0))), grid=4, canvas=128)


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        fl.render(CRAFTED, style="pixel")
    with pytest.raises(ValueError, match="player"):
        fl.render(CRAFTED, player=(3, 0))
    with pytest.raises(ValueError, match="last_action"):
        fl.render(CRAFTED, last_action="left")


def test_small_cell_render_is_cached_and_consistent():
    a = fl.render(CRAFTED, None, "gymnasium", "R", cell_px=16)
    assert a.shape == (48, 48, 3)
    np.testing.assert_array_equal(a, fl.render(CRAFTED, None, "gymnasium", "R", cell_px=16))
    np.testing.assert_array_equal(fl.render_canvas(CRAFTED, None, "gymnasium", "R")[:48, :48], a)


# ------------------------------------------------------------------------------------------ oracle


def noisy(img, rng, sigma):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("canvas", [128, 64])
def test_oracle_reads_clean_and_noisy_canvases(style, canvas):
    rng = np.random.default_rng(5)
    for _ in range(60):
        m, player, last = random_case(rng)
        img = fl.render_canvas(m, player, style, last, canvas=canvas)
        truth = fl.state_of(m, player, style)
        clean = fl.read_canvas(img, m.size)
        assert clean == truth and clean.style == style
        assert fl.read_canvas(noisy(img, rng, 10.0), m.size) == truth
        assert fl.read_canvas(img, m.size, style=style) == truth


@pytest.mark.parametrize("style", STYLES)
def test_oracle_tolerates_blur_and_reads_full_size_maps(style):
    rng = np.random.default_rng(6)
    for _ in range(15):
        m, player, last = random_case(rng)
        truth = fl.state_of(m, player, style)
        full = fl.render_env(m, player, style, last)
        assert fl.read_map(full) == truth
        blurred = np.asarray(Image.fromarray(fl.render_canvas(m, player, style, last))
                             .filter(ImageFilter.GaussianBlur(1)))
        assert fl.read_canvas(blurred, m.size) == truth


def test_oracle_reports_missing_or_duplicated_objects():
    m = LakeMap.from_desc(["SFF", "FHF", "FFG"])
    img = fl.render_canvas(m, (0, 0), "classic")
    twice = img.copy()
    twice[32:48, 0:16] = img[0:16, 0:16]  # paste the elf cell again at (2, 0)
    st = fl.read_canvas(twice, 3)
    assert st.player is None and st.goal == (2, 2) and st.holes == {(1, 1)}
    no_goal = img.copy()
    no_goal[32:48, 32:48] = img[0:16, 16:32]  # cover the goal with ice
    assert fl.read_canvas(no_goal, 3).goal is None


def test_state_of_hides_player_in_hole_for_gymnasium_only():
    assert fl.state_of(CRAFTED, (1, 1), "gymnasium").player is None
    assert fl.state_of(CRAFTED, (1, 1), "classic").player == (1, 1)  # cracked-hole sprite


def test_read_canvas_rejects_bad_input():
    with pytest.raises(ValueError, match="canvas_img"):
        fl.read_canvas(np.zeros((128, 96, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="canvas_img"):
        fl.read_canvas(np.zeros((100, 100, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="size"):
        fl.read_canvas(np.zeros((128, 128, 3), np.uint8), 9)


def test_kill_still_stops_a_process_that_rendered_a_classic_board():
    """SDL (pygame, under gym's classic renderer) takes over SIGTERM, which Python leaves at its default, unless
    told not to: ``kill`` and ``timeout`` would no longer stop an evaluation."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, time, numpy as np\n"
            "from latentum.worlds import frozenlake as fl\n"
            "m = fl.generate_map(3, np.random.default_rng(0))\n"
            "fl.render_canvas(m, m.player, 'classic')\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('survived')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGTERM and "survived" not in out.stdout, (out.returncode, out.stderr[-500:])
