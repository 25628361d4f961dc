"""``latentum eval shapes`` (issue #28's measurements): every figure is a rate in [0, 1] from the oracle or
exact answers, GenEval-phrased prompts with words outside the vocabulary are reported, and codebook usage
counts codes from the codes themselves."""

import json

from latentum import LatentUM
from latentum.apps.shapes.evaluate import codebook_usage, evaluate_shapes
from latentum.cli import main
from latentum.worlds import shapes


def test_the_report_holds_every_figure(debug_run):
    api = LatentUM.from_pretrained(debug_run / "model")
    report = evaluate_shapes(api, per_category=2, per_type=2, usage_images=4, progress=False)
    for name in ("t2i", "t2i_geneval", "t2i_reason"):
        assert set(shapes.CATEGORIES) | {"overall"} <= set(report[name])
        assert all(0 <= report[name][c] <= 1 for c in shapes.CATEGORIES)
    assert "refused_words" not in report["t2i_geneval"]  # the built-in vocabulary has GenEval's template
    rec = report["reconstruction"]
    assert rec["real_at_decoder_resolution"] >= 0.5  # the oracle reads the real pictures
    assert abs(rec["decoded"] - sum(rec[c] for c in shapes.CATEGORIES) / len(shapes.CATEGORIES)) < 1e-9
    assert set(report["understanding"]) == set(shapes.QA_TYPES)
    assert 0 <= report["read_back"]["count"] <= 1 and report["read_back"]["questions"] >= 6 * 2 * 3
    judged = report["self_judged"]  # the debug model's vocabulary has the reflection protocol's words
    assert {"plain", "best_of", "refine_0", "refine_3"} <= set(judged)
    assert all(1 <= judged["refine_images"][c] <= 4 for c in shapes.CATEGORIES)


def test_codebook_usage_counts_the_codes(debug_run):
    api = LatentUM.from_pretrained(debug_run / "model")
    usage = codebook_usage(api, images=4, seed=0)
    K = api.config.quantizer.codebook_size
    for g in range(api.config.quantizer.codebooks):
        u = usage[f"cb{g}"]
        assert 1 <= u["used"] <= K and u["used"] + u["dead"] == K and 1 <= u["perplexity"] <= u["used"] + 1e-6


def test_cli_eval_shapes_writes_json(debug_run, tmp_path, capsys):
    out = tmp_path / "shapes.json"
    code = main(["eval", "shapes", "--model", str(debug_run / "model"), "--per-category", "1", "--out", str(out),
                 "--only", "reconstruction"])  # every part together: test_the_report_holds_every_figure
    assert code == 0 and "reconstruction" in capsys.readouterr().out
    assert json.loads(out.read_text())["per_category"] == 1


def test_cli_eval_shapes_runs_only_the_parts_asked_for(debug_run, capsys):
    code = main(["eval", "shapes", "--model", str(debug_run / "model"), "--per-category", "1",
                 "--only", "understanding", "codebook_usage"])
    out = capsys.readouterr().out
    assert code == 0 and "understanding:" in out and "codebook usage:" in out
    assert "reconstruction" not in out and "t2i" not in out


def test_cli_eval_shapes_names_an_unknown_part(debug_run, capsys):
    code = main(["eval", "shapes", "--model", str(debug_run / "model"), "--only", "reconstuction"])
    assert code == 2 and "reconstuction" in capsys.readouterr().err


def test_prompts_with_words_a_model_lacks_are_reported_not_guessed():
    from latentum.apps.shapes.evaluate import GENEVAL_TEMPLATE, text_to_image

    old = LatentUM.from_pretrained("checkpoints/tiny")  # its vocabulary predates GenEval's template
    report = text_to_image(old, per_category=1, seed=0, cfg_scale=3.0, template=GENEVAL_TEMPLATE)
    assert report["refused_words"] == ["photo"] and report["overall"] == 0.0


def test_a_worked_out_answer_scores_by_its_final_words():
    from types import SimpleNamespace

    import numpy as np

    from latentum.apps.shapes.evaluate import ANSWER_TOKENS, answers
    from latentum.worlds.registry import default_tokenizer

    tok = default_tokenizer()
    replies = ["two", "a red circle at row 2 column 5 , a red square at row 3 column 1 , two", "Yes"]
    api = SimpleNamespace(tokenizer=tok, answer_batch=lambda images, questions, max_new_tokens: replies)
    assert answers(api, [None] * 3, ["q"] * 3) == ["two", "two", "Yes"]
    rng = np.random.default_rng(3)  # the longest description (five objects) and an answer fit in the room given
    longest = max(len(tok.encode(shapes.describe_sample(rng).assistant[0] + " , two")) for _ in range(200))
    assert 40 < longest <= ANSWER_TOKENS
