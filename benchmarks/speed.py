"""latentum against its peers on this machine, side by side in one run (issue #30): medians and ratios.

    python benchmarks/speed.py              # a few minutes on 2 CPU cores
    python benchmarks/speed.py --quick      # fewer repeats, smaller batches: a smoke run
    python benchmarks/speed.py --only planning    # one section (train, decode, images, interleaved, planning)

Figures (each ratio is latentum / peer, > 1 means latentum is faster; the training steps and decoding are timed
in turn with their peers, round after round, so that a drift of the machine's speed moves both alike):
- training step, fp32: the MoME backbone with every token on one branch (dense) against ``transformers``
  Qwen2 of the same dims and weights (``model.hf.backbone_from_hf``), at the shipped dims and at d=512 x 8;
- MoME (half the tokens on each branch) against the same backbone dense;
- bf16 autocast against fp32 for the dense step, with what ``precision: auto`` picks here (at d=512 only where
  bf16 was not already slow at the shipped dims);
- cached greedy decoding at batch 1 and 16: the backbone's cached forward against ``transformers``
  ``generate`` on the same weights (the greedy tokens are compared too); with ``--compile`` also through the
  compiled static decode step (``MoMEBackbone.compile_decode``), its compile time printed;
- text-to-image (``generate_images``) of 16 prompts in one batch against one at a time, with the shipped model;
- free interleaved generation (``generate``, greedy) of 32 inputs, planning prompts on maps of every size and
  Shapes prompts, with 16 rows, continuously batched, against one input at a time (the outputs are compared too);
- planning 96 fresh maps of every size (16 per size) with 16 rows, continuously batched, against one map at a
  time, with the shipped model (the plans are compared too);
- the forward that dominates a plan, a drafted thought checked in one forward of 66 tokens on a cached context,
  with 16 rows against one, and the share of one-at-a-time planning spent in such many-token forwards: with
  Amdahl's law, how much batching can speed planning up at most on this machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from latentum.api import LatentUM
from latentum.apps.vsp import entry
from latentum.apps.vsp.evaluate import eval_maps
from latentum.model.hf import backbone_from_hf
from latentum.train.precision import auto_precision
from latentum.types import GREEDY, LatentImage
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake.tasks import PLAN_PROMPT


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def medians(fns: dict, repeats: int) -> dict:
    """The median time of each of ``fns`` (name -> callable), timed in turn, round after round: a machine whose
    speed drifts (other tenants, clocks) moves every figure alike, and the ratios stay put."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn, repeats: int) -> float:
    """The median time of ``fn`` over ``repeats`` runs, after a warm-up."""
    return medians({"fn": fn}, repeats)["fn"]


def peer(dim: int, depth: int, heads: int, ffn: int, vocab: int = 111) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).train()


def train_steps(dim: int, depth: int, heads: int, ffn: int, batch: int, seq: int, repeats: int,
                bf16: bool = True) -> dict:
    """Tokens/s of a training step (forward + backward): ours dense, MoME and (``bf16``) bf16 autocast; HF Qwen2."""
    hf = peer(dim, depth, heads, ffn)
    ours = backbone_from_hf(hf).train()
    ids = torch.randint(0, 111, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).expand(batch, seq)
    dense, mixed = torch.zeros(batch, seq, dtype=torch.bool), torch.zeros(batch, seq, dtype=torch.bool)
    mixed[:, seq // 2:] = True

    def ours_step(gen_mask, dtype=None):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                logits = ours.logits(ours(ours.embed(ids), gen_mask, positions).hidden)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
            loss.backward()
            ours.zero_grad(set_to_none=True)
        return step

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()
        hf.zero_grad(set_to_none=True)

    tokens = batch * seq
    t = medians({"dense": ours_step(dense), "hf": hf_step, "mixed": ours_step(mixed)}, repeats)
    t_bf16 = median_time(ours_step(dense, torch.bfloat16), repeats) if bf16 else None
    return {"dense_tok_s": tokens / t["dense"], "hf_tok_s": tokens / t["hf"], "mome_tok_s": tokens / t["mixed"],
            "bf16_tok_s": tokens / t_bf16 if bf16 else None}


@torch.inference_mode()
def decode(batch: int, new_tokens: int, repeats: int, compiled: bool = False) -> dict:
    api = LatentUM.from_pretrained("checkpoints/tiny")
    bb = api.config.backbone
    hf = peer(bb.dim, bb.depth, bb.heads, bb.ffn_hidden).eval()
    ours = backbone_from_hf(hf).eval()
    if compiled:
        ours.compile_decode()
    prompt = torch.randint(7, 111, (batch, 12), generator=torch.Generator().manual_seed(1))

    def ours_decode():
        cache = ours.new_cache(batch, 12 + new_tokens)
        positions = torch.arange(12).expand(batch, 12)
        out = ours(ours.embed(prompt), torch.zeros(batch, 12, dtype=torch.bool), positions, cache=cache)
        tokens = []
        for t in range(new_tokens):
            nxt = ours.logits(out.hidden[:, -1]).argmax(-1)
            tokens.append(nxt)
            out = ours(ours.embed(nxt[:, None]), torch.zeros(batch, 1, dtype=torch.bool),
                       torch.full((batch, 1), 12 + t), cache=cache)
        return torch.stack(tokens, 1)

    def hf_decode():
        return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)[:, 12:]

    t0 = time.perf_counter()
    same = torch.equal(ours_decode(), hf_decode())  # (the first call compiles the static step, when on)
    first = time.perf_counter() - t0
    t = medians({"ours": ours_decode, "hf": hf_decode}, repeats)
    return {"ours_tok_s": batch * new_tokens / t["ours"], "hf_tok_s": batch * new_tokens / t["hf"], "same_tokens": same,
            "first_s": first}


def planning(per_level: int, repeats: int, batch: int = 16) -> dict:
    """Greedy plans of fresh maps of every size (3x3 .. 8x8, ``per_level`` each): ``plan_batch`` with ``batch``
    rows (continuous batching) against one ``plan`` call per map; the plans are compared too."""
    api = LatentUM.from_pretrained("checkpoints/tiny")
    maps = [m for level in range(3, 9) for m in eval_maps(level, per_level, seed=11)]
    boards = [fl.render_canvas(m, m.player, "gymnasium", canvas=api.canvas) for m in maps]
    together, alone = [], []
    t_batch = median_time(lambda: together.append(entry.plan_batch(api, boards, batch=batch)), repeats)
    t_single = median_time(lambda: alone.append([entry.plan(api, b) for b in boards]), repeats)
    same = all(a.actions == b.actions for a, b in zip(together[-1], alone[-1]))
    return {"maps": len(maps), "batched_plans_s": len(maps) / t_batch, "single_plans_s": len(maps) / t_single,
            "same_plans": same}


def thought_forward(batch: int, context: int, repeats: int, tokens: int = 66) -> dict:
    """The shipped backbone's forward of ``tokens`` generation-branch tokens (a drafted thought and its markers) on
    a cached context of ``context`` tokens, at ``batch`` rows: rows per second."""
    api = LatentUM.from_pretrained("checkpoints/tiny")
    bb = api.model.backbone
    gen = torch.Generator().manual_seed(2)
    cache = bb.new_cache(batch, context + tokens)
    with torch.inference_mode():
        prefix = bb.embed(torch.randint(7, 100, (batch, context), generator=gen))
        new = bb.embed(torch.randint(7, 100, (batch, tokens), generator=gen))
        bb(prefix, torch.zeros(batch, context, dtype=torch.bool), torch.arange(context).expand(batch, -1), cache=cache)

        def forward():
            cache.truncate(context)
            bb(new, torch.ones(batch, tokens, dtype=torch.bool),
               torch.arange(context, context + tokens).expand(batch, -1), cache=cache)

        return {"rows_s": batch / median_time(forward, repeats)}


def many_token_share(per_level: int, tokens: int = 32) -> float:
    """The share of one-at-a-time planning time (maps of every size) spent in backbone forwards of ``tokens`` or
    more new tokens (a prompt, a drafted thought): work that is arithmetic, not overhead, at batch 1."""
    api = LatentUM.from_pretrained("checkpoints/tiny")
    bb = api.model.backbone
    maps = [m for level in range(3, 9) for m in eval_maps(level, per_level, seed=11)]
    boards = [fl.render_canvas(m, m.player, "gymnasium", canvas=api.canvas) for m in maps]
    forward, spent = bb.forward, [0.0]

    def timed(x, *args, **kwargs):
        t0 = time.perf_counter()
        out = forward(x, *args, **kwargs)
        if x.size(1) >= tokens:
            spent[0] += time.perf_counter() - t0
        return out

    entry.plan(api, boards[0])  # warm-up
    bb.forward = timed
    t0 = time.perf_counter()
    for b in boards:
        entry.plan(api, b)
    return spent[0] / (time.perf_counter() - t0)


def image_generation(batch: int, repeats: int) -> dict:
    """Text-to-image with the shipped model (CFG 3, sampled): ``batch`` prompts in one call against one at a time."""
    api = LatentUM.from_pretrained("checkpoints/tiny")
    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")] * (batch // 4 + 1)
    prompts = prompts[:batch]
    t_batch = median_time(lambda: api.generate_images(prompts, seed=0), repeats)
    t_single = median_time(lambda: [api.generate_images([p], seed=0) for p in prompts], repeats)
    return {"batched_images_s": batch / t_batch, "single_images_s": batch / t_single}


def interleaved_generation(per_level: int, repeats: int, batch: int = 16, max_images: int = 4) -> dict:
    """``generate`` on planning prompts (fresh maps, ``per_level`` of each size) and as many Shapes prompts, greedy,
    at most ``max_images`` images and 32 tokens each: ``batch`` rows (continuous batching) against one input at a
    time."""
    api = LatentUM.from_pretrained("checkpoints/tiny")
    maps = [m for level in range(3, 9) for m in eval_maps(level, per_level, seed=13)]
    inputs = [[PLAN_PROMPT, fl.render_canvas(m, m.player, "gymnasium", canvas=api.canvas)] for m in maps]
    shapes = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    inputs += [[shapes[i % len(shapes)]] for i in range(len(maps))]
    kw = dict(max_images=max_images, max_new_tokens=32, sampling=GREEDY)
    together, alone = [], []
    t_batch = median_time(lambda: together.append(api.generate(inputs, batch=batch, **kw)), repeats)
    t_single = median_time(lambda: alone.append([api.generate(x, **kw) for x in inputs]), repeats)
    same = all(len(a) == len(b) and all(torch.equal(x.ids, y.ids) if isinstance(x, LatentImage) else x == y
                                        for x, y in zip(a, b)) for a, b in zip(together[-1], alone[-1]))
    return {"inputs": len(inputs), "batched_s": len(inputs) / t_batch, "single_s": len(inputs) / t_single,
            "same": same}


SECTIONS = ("train", "decode", "images", "interleaved", "planning")


def report_training(quick: bool, r: int) -> None:
    """bf16 at d=512 only where bf16 was not already slow at the shipped dims: on a CPU without fast bf16 one such
    step takes minutes, and the shipped dims already show it."""
    bf16_fast = True
    for name, dims in (("shipped dims (160 x 6)", (160, 6, 5, 448)), ("d=512 x 8", (512, 8, 8, 1536))):
        t = train_steps(*dims, batch=2 if quick else 8, seq=128 if quick else 512, repeats=r, bf16=bf16_fast)
        print(f"| training step fp32, {name}, tok/s | {t['dense_tok_s']:.0f} | HF Qwen2 {t['hf_tok_s']:.0f} | "
              f"{t['dense_tok_s'] / t['hf_tok_s']:.2f}x |")
        print(f"| MoME step vs dense, {name}, tok/s | {t['mome_tok_s']:.0f} | dense {t['dense_tok_s']:.0f} | "
              f"{t['mome_tok_s'] / t['dense_tok_s']:.2f}x |")
        if t["bf16_tok_s"] is None:
            print(f"| bf16 autocast vs fp32, {name} | not timed: bf16 was already slow at the shipped dims | | |")
            continue
        ratio = t["bf16_tok_s"] / t["dense_tok_s"]
        bf16_fast = ratio >= 0.5
        print(f"| bf16 autocast vs fp32, {name}, tok/s | {t['bf16_tok_s']:.0f} | fp32 {t['dense_tok_s']:.0f} | "
              f"{ratio:.2f}x |")


def report_decode(quick: bool, r: int, compile_too: bool) -> None:
    for compiled in (False, True) if compile_too else (False,):
        for batch in (1, 16):
            d = decode(batch, 16 if quick else 64, r, compiled)
            kind = "compiled static step (first call incl. compile " f"{d['first_s']:.0f} s)" if compiled else "eager"
            print(f"| cached greedy decode, {kind}, batch {batch}, tok/s | {d['ours_tok_s']:.0f} | HF generate "
                  f"{d['hf_tok_s']:.0f} | {d['ours_tok_s'] / d['hf_tok_s']:.2f}x (same tokens: {d['same_tokens']}) |")


def report_images(quick: bool) -> None:
    g = image_generation(2 if quick else 16, 1 if quick else 3)
    print(f"| generate_images of {2 if quick else 16} prompts in one batch vs one at a time, images/s | "
          f"{g['batched_images_s']:.2f} | {g['single_images_s']:.2f} | "
          f"{g['batched_images_s'] / g['single_images_s']:.2f}x |")


def report_interleaved(quick: bool) -> None:
    i = interleaved_generation(1 if quick else 3, 1 if quick else 3, max_images=1 if quick else 4)
    print(f"| generate (interleaved) of {i['inputs']} inputs, batch 16 (continuous) vs one at a time, inputs/s | "
          f"{i['batched_s']:.2f} | {i['single_s']:.2f} | {i['batched_s'] / i['single_s']:.2f}x "
          f"(same outputs: {i['same']}) |")


def report_planning(quick: bool) -> None:
    p = planning(1 if quick else 16, 1 if quick else 3)
    print(f"| plan_batch of {p['maps']} maps of 3x3-8x8, batch 16 (continuous) vs one at a time, plans/s | "
          f"{p['batched_plans_s']:.2f} | {p['single_plans_s']:.2f} | "
          f"{p['batched_plans_s'] / p['single_plans_s']:.2f}x (same plans: {p['same_plans']}) |")
    one, many = (thought_forward(b, 400, 3 if quick else 20) for b in (1, 16))
    speedup = many["rows_s"] / one["rows_s"]
    print(f"| a plan's dominant forward (a drafted thought, 66 tokens on 400 cached), 16 rows vs 1, rows/s | "
          f"{many['rows_s']:.1f} | {one['rows_s']:.1f} | {speedup:.2f}x |")
    share = many_token_share(1 if quick else 4)
    print(f"| share of one-at-a-time planning in forwards of 32+ tokens; the most 16 rows can give (Amdahl: those at "
          f"{speedup:.2f}x, the rest 16x) | {share:.2f} | | {1 / (share / speedup + (1 - share) / 16):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches (a smoke run)")
    ap.add_argument("--compile", action="store_true",
                    help="also decode with the compiled static step (MoMEBackbone.compile_decode; compiles first)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                    help=f"run only these sections, of {', '.join(SECTIONS)} (default all)")
    args = ap.parse_args()
    r = 1 if args.quick else 5
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; precision auto -> {auto_precision()[0]}")
    print("| figure | latentum | peer | ratio |\n|---|---|---|---|")
    run = {"train": lambda: report_training(args.quick, r),
           "decode": lambda: report_decode(args.quick, r, args.compile),
           "images": lambda: report_images(args.quick),
           "interleaved": lambda: report_interleaved(args.quick),
           "planning": lambda: report_planning(args.quick)}
    for section in SECTIONS:
        if section in args.only:
            run[section]()


if __name__ == "__main__":
    main()
