"""Shared fixtures: a model trained end to end by the debug recipe, and an untrained model folder.

Both are session-scoped: the debug run takes ~10-30 s on 2 CPU cores and several test files read it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = ROOT / "configs" / "recipes" / "debug.yaml"


def pytest_configure(config):
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the test models are so small that thread
    synchronisation dominates, and on a busy 2-core machine two threads made the debug run 8x slower
    (13 s instead of 1.7 s) while one thread stays steady."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory) -> Path:
    """Run folder of ``configs/recipes/debug.yaml`` trained through all four stages; the final model is
    ``<run>/model`` (with ``decoder/``), each stage's files are under ``<run>/<stage>``."""
    from latentum.train.config import load_recipe
    from latentum.train.run import train_recipe

    out = tmp_path_factory.mktemp("debug_run")
    final = train_recipe(load_recipe(str(DEBUG_RECIPE)), out, progress=False)
    assert Path(final) == out / "model"
    return out


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A loadable model folder with random weights (debug-recipe sizes, no decoder/): for tests of argument
    handling that must not depend on training working."""
    from latentum.checkpoint import save_model_folder
    from latentum.model.latentum import LatentUMModel
    from latentum.train.config import load_recipe
    from latentum.worlds.registry import default_tokenizer

    cfg = copy.deepcopy(load_recipe(str(DEBUG_RECIPE)).model)
    tok = default_tokenizer()
    cfg.backbone.vocab_size = tok.vocab_size
    out = tmp_path_factory.mktemp("untrained") / "model"
    save_model_folder(LatentUMModel(cfg), tok, out)
    return out


@pytest.fixture
def moves_first(monkeypatch):
    """The debug model is barely trained and may say "Done" before any move: make every FrozenLake move its
    first choice wherever a move is allowed, so tests of what happens after moves have moves to check."""
    import torch

    from latentum.generation.engine import Decoder
    from latentum.worlds.frozenlake import ACTIONS

    logits = Decoder.text_logits

    def prefer_moves(self):
        out = logits(self)
        ids = torch.tensor([self.tok.encode(a)[0] for a in ACTIONS], device=out.device)
        return out.index_add(-1, ids, torch.full((out.size(0), len(ids)), 1e4, device=out.device))

    monkeypatch.setattr(Decoder, "text_logits", prefer_moves)
