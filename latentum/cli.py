"""The ``latentum`` command: train, eval, plan, generate, answer, demo. ``latentum <cmd> --help`` explains each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "checkpoints/tiny"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder (default: {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="latentum", description="A latent-space unified multimodal model: "
                                 "train its stages, evaluate, plan FrozenLake maps, generate and answer.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe's legs (all, or one)",
                       description="Train a recipe's legs in order with Lightning (stages vlm, mbaq, mome, decoder). "
                       "Each leg exports weights the legs after it start from; the last model leg and the last "
                       "decoder leg are assembled into <out>/model. A run folder that exists is refused unless "
                       "--resume (continue from each leg's last checkpoint) or --overwrite (start over).")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/recipes/tiny.yaml")
    p.add_argument("--leg", "--stage", dest="leg", default="all",
                   help="one leg's name (in a recipe with stages:, the stage's name) or all (default: all)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue each leg from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start legs that already have a run over")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default: 0)")
    p.add_argument("--devices", type=int, default=None, help="override the number of devices/processes")
    p.add_argument("--strategy", default=None, help="override the Lightning strategy (auto, ddp, ddp_spawn, fsdp)")
    p.add_argument("--steps", type=int, default=None, help="override every leg's step count")

    p = sub.add_parser("eval", help="evaluate a model", description="Evaluate on fresh seeds never used in "
                       "training. 'vsp': planning success (gym and strict rules), perception QA, safety, "
                       "visual-thought fidelity and seconds per plan, with the baselines side by side. 'shapes': "
                       "text-to-image by the pixel oracle per GenEval category, reconstruction through the codes, "
                       "Shapes QA and codebook usage.")
    p.add_argument("suite", choices=["vsp", "shapes"], help="vsp: planning and perception on FrozenLake maps; "
                   "shapes: text-to-image by the pixel oracle per GenEval category, reconstruction, QA, reading its "
                   "own latents back, codebook use; plain vs best-of-k vs refine for a model trained to reflect")
    _add_model(p)
    p.add_argument("--per-level", type=int, default=100, help="vsp: maps per level and style (default: 100)")
    p.add_argument("--per-category", type=int, default=30,
                   help="shapes: prompts per GenEval category and questions per QA type (default: 30)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="shapes: classifier-free guidance (default: 3.0)")
    p.add_argument("--only", nargs="+", default=None, metavar="PART",
                   help="shapes: run only these parts of the report (t2i, t2i_geneval, t2i_reason, reconstruction, "
                        "understanding, read_back, codebook_usage, self_judged)")
    p.add_argument("--levels", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8], help="map sizes")
    p.add_argument("--styles", nargs="+", default=["gymnasium", "classic"], help="render styles")
    p.add_argument("--text-model", default=None, help="text-only planner folder for the side-by-side baseline")
    p.add_argument("--pixel", action="store_true", help="also run pixel-mediated thoughts (slow)")
    p.add_argument("--heed-looks", action=argparse.BooleanOptionalAction, default=True,
                   help="hold every planner to its own looks: no move into a cell it just named a hole or the edge "
                        "(default; --no-heed-looks scores free choices)")
    p.add_argument("--avoid-revisits", action="store_true",
                   help="keep every planner off cells its plan already stood on while a move to a new cell is left")
    p.add_argument("--oracle-thoughts", action="store_true",
                   help="also plan with the true next boards as thoughts (a diagnostic: thought errors vs move choice)")
    p.add_argument("--latency-maps", type=int, default=5,
                   help="maps per level and style timed one at a time for seconds per plan (default: 5)")
    p.add_argument("--out", default=None, help="write the results as JSON here")

    p = sub.add_parser("plan", help="plan a FrozenLake map image",
                       description="Plan a FrozenLake map image (gymnasium or classic gym render, 64 px per cell).")
    p.add_argument("image", help="path to the map image (PNG/JPEG)")
    _add_model(p)
    p.add_argument("--max-steps", type=int, default=None,
                   help="most moves in the plan (default: 4 per cell of the map's side, 32 on 8x8)")
    p.add_argument("--gif", default=None, help="write a GIF of the map and rendered visual thoughts here "
                   "(thoughts drawn in the render style read from the map, given the map as their reference)")

    p = sub.add_parser("generate", help="generate images from text (latent, then rendered)",
                       description="Text -> latent image tokens (classifier-free guidance) -> pixels.")
    p.add_argument("prompt", nargs="+", help="one or more prompts, e.g. 'a red circle'")
    _add_model(p)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--refine", type=int, metavar="ROUNDS", help="reason, reflect, refine: up to ROUNDS edits, each "
                     "from the model's own reading of its last image; writes every round (NN_rR.png)")
    how.add_argument("--best-of", type=int, metavar="K", help="sample K images per prompt and keep the one the "
                     "model's own reading judges best")
    p.add_argument("--out", default="outputs/generate", help="folder for the PNGs")

    p = sub.add_parser("answer", help="answer a question about an image",
                       description="Answer a question about an image with the understanding branch.")
    p.add_argument("image", help="path to the image")
    p.add_argument("question", help="e.g. 'Is there a hole at row 2 column 3 ?'")
    p.add_argument("--board", action="store_true", help="the image is a FrozenLake map render (64 px per cell): "
                   "lay it out cell by cell as the planner does, instead of resizing it")
    _add_model(p)

    p = sub.add_parser("demo", help="plan a few maps with the shipped checkpoint and write GIFs (or: demo shapes)",
                       description="Plan a few maps of each size in both render styles with the shipped model, "
                       "print a results table and write GIFs (map | rendered thoughts | simulated states). "
                       "'demo shapes': one prompt per GenEval category, generated, judged by the oracle and read "
                       "back by the model (and refined, for a model trained to reflect), as a grid PNG.")
    p.add_argument("world", nargs="?", choices=["vsp", "shapes"], default="vsp", help="vsp (default) or shapes")
    _add_model(p)
    p.add_argument("--per-size", type=int, default=2, help="maps per size and style (default: 2)")
    p.add_argument("--out", default="outputs/demo", help="folder for the GIFs")

    p = sub.add_parser("convert", help="convert an official LatentUM checkpoint or a transformers InternVL folder",
                       description="Write a latentum model folder from (1) an official LatentUM folder (config.json "
                       "with internvl_config, model.safetensors under internvl./quantizer., the InternVL tokenizer "
                       "files): every tensor is checked into its place; LatentUM.from_pretrained also reads it "
                       "directly; or (2) a local transformers InternVL folder (model_type internvl): its tower, "
                       "projector and LM, the generation branch a copy of the LM, a new MBAQ and AR head sized by "
                       "--quantizer/--head, ready for a recipe's mbaq leg (init_from). Nothing is downloaded.")
    p.add_argument("source", help="official LatentUM folder, or transformers InternVL folder")
    p.add_argument("out", help="latentum model folder to write (replaced atomically if it exists)")
    p.add_argument("--quantizer", nargs="*", default=[], metavar="KEY=VALUE",
                   help="InternVL source: MBAQ config fields, e.g. codebooks=8 codebook_size=2048 code_dim=32 "
                        "hidden_dim=16384 up_hidden_dim=10240 projector_hidden_dim=2560 (LatentUM-Base's; the default)")
    p.add_argument("--head", nargs="*", default=[], metavar="KEY=VALUE",
                   help="InternVL source: AR head config fields (default depth=3 heads=32 depth_rope=true, "
                        "LatentUM-Base's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"latentum {args.command}: error: {e}", file=sys.stderr)
        return 2


# Commands import what they use inside themselves, so `latentum --help` starts without torch.
def _load(args):
    from latentum.api import LatentUM

    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is not a model folder (no config.json)")
    try:
        return LatentUM.from_pretrained(args.model)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None


def cmd_train(args) -> int:
    from latentum.train.config import STRATEGIES, load_recipe
    from latentum.train.run import assemble, train_leg, train_recipe

    recipe = load_recipe(args.config)
    for name, value in (("devices", args.devices), ("steps", args.steps)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.strategy is not None and args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {args.strategy!r}")
    for leg in recipe.legs:
        leg.config.devices = args.devices or leg.config.devices
        leg.config.strategy = args.strategy or leg.config.strategy
        leg.config.steps = args.steps or leg.config.steps
    out = Path(args.out or f"runs/{recipe.name}")
    if args.leg == "all":
        final = train_recipe(recipe, out, resume=args.resume, overwrite=args.overwrite, num_workers=args.workers)
        print(f"model exported to {final}")
        return 0
    export = train_leg(recipe, recipe.leg(args.leg).name, out, resume=args.resume, overwrite=args.overwrite,
                       num_workers=args.workers)
    print(f"leg {args.leg} exported to {export}")
    try:
        print(f"model assembled in {assemble(recipe, out)}")
    except (ValueError, FileNotFoundError):
        pass  # an earlier leg has not been trained yet
    return 0


def cmd_eval(args) -> int:
    if args.suite == "shapes":
        from latentum.apps.shapes import evaluate as shapes_eval

        report = shapes_eval.evaluate_shapes(_load(args), per_category=args.per_category, per_type=args.per_category,
                                             seed=args.seed, cfg_scale=args.cfg_scale, only=args.only)
        shapes_eval.print_report(report)
        return _write_json(report, args.out)
    from latentum.apps.vsp.evaluate import evaluate_vsp, print_report

    report = evaluate_vsp(_load(args), levels=args.levels, styles=args.styles, per_level=args.per_level,
                          seed=args.seed, text_model=args.text_model, pixel=args.pixel,
                          latency_maps=args.latency_maps, oracle=args.oracle_thoughts,
                          heed_looks=args.heed_looks, avoid_revisits=args.avoid_revisits)
    print_report(report)
    return _write_json(report, args.out)


def _write_json(report: dict, out: str | None) -> int:
    if out:
        import json

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return 0


def cmd_plan(args) -> int:
    from latentum.apps.vsp.demo import plan_image

    print(plan_image(_load(args), args.image, max_steps=args.max_steps, seed=args.seed, gif=args.gif))
    return 0


def cmd_generate(args) -> int:
    api = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.refine is not None:
        refined = api.refine(args.prompt, rounds=args.refine, cfg_scale=args.cfg_scale, seed=args.seed)
        for i, judged in enumerate(refined):
            for r, (image, said) in enumerate(zip(api.render(judged.images, seed=args.seed), judged.reflections)):
                image.save(out / f"{i:02d}_r{r}.png")
                print(f"{out / f'{i:02d}_r{r}.png'}: {judged.prompt} | round {r}, the model says: {said}")
            api.render(judged.image, seed=args.seed).save(out / f"{i:02d}.png")
            print(f"{out / f'{i:02d}.png'}: {judged.prompt} (round {judged.best}, the one it judges best)")
        return 0
    if args.best_of is not None:
        latents = [j.image for j in api.best_of(args.prompt, k=args.best_of, cfg_scale=args.cfg_scale, seed=args.seed)]
    else:
        latents = api.generate_images(args.prompt, cfg_scale=args.cfg_scale, seed=args.seed)
    for i, (prompt, image) in enumerate(zip(args.prompt, api.render(latents, seed=args.seed))):
        path = out / f"{i:02d}.png"
        image.save(path)
        print(f"{path}: {prompt}")
    return 0


def cmd_answer(args) -> int:
    from latentum.apps.vsp.entry import board_canvas

    api = _load(args)
    image = board_canvas(api, args.image, "image") if args.board else args.image
    print(api.answer(image, args.question, seed=args.seed))
    return 0


def cmd_demo(args) -> int:
    if args.world == "shapes":
        from latentum.apps.shapes.demo import run_shapes_demo

        run_shapes_demo(_load(args), out=args.out, seed=args.seed)
        return 0
    from latentum.apps.vsp.demo import run_demo

    run_demo(_load(args), per_size=args.per_size, out=args.out, seed=args.seed)
    return 0


LATENTUM_BASE_QUANTIZER = dict(codebooks=8, codebook_size=2048, code_dim=32, hidden_dim=16384, up_hidden_dim=10240,
                               projector_hidden_dim=2560)
LATENTUM_BASE_HEAD = dict(depth=3, heads=32, depth_rope=True, final_norm_eps=1e-5)


def _fields(pairs: list[str], flag: str, defaults: dict) -> dict:
    """``["k=v", ...]`` -> a dict over ``defaults``, each value parsed as YAML (ints, floats, true/false)."""
    import yaml

    out = dict(defaults)
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_convert(args) -> int:
    import json

    from latentum.checkpoint import convert_hf_vlm, convert_official, read_config
    from latentum.config import HeadConfig, QuantizerConfig, from_dict

    if read_config(Path(args.source)).get("model_type") == "internvl":
        quantizer = from_dict(QuantizerConfig, _fields(args.quantizer, "--quantizer", LATENTUM_BASE_QUANTIZER),
                              "--quantizer")
        head = from_dict(HeadConfig, _fields(args.head, "--head", LATENTUM_BASE_HEAD), "--head")
        out = convert_hf_vlm(args.source, args.out, quantizer, head)
    else:
        out = convert_official(args.source, args.out)
    print(f"wrote {out}: {json.dumps(read_config(out)['model']['encoder'])}")
    return 0


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval, "plan": cmd_plan, "generate": cmd_generate,
            "answer": cmd_answer, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
