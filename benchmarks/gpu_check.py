"""The GPU path measured in one run: stage-2 training of a ~0.5B-class MoME in bf16 (tokens/s and MFU against
the device's bf16 peak), cached greedy decoding at batch 1 and 16, and batched planning with the shipped model.

    python benchmarks/gpu_check.py                       # on a CUDA device
    python benchmarks/gpu_check.py --tiny --steps 5      # a seconds-long smoke run of the same code on any device

The training model has the backbone of Qwen2-0.5B (24 layers, width 896, 14 heads, 2 kv heads, SwiGLU 4864) in
both branches, so ~0.7B parameters, of which stage 2 trains the generation branch (~0.36B) under bf16
autocast with AdamW; each sequence is half prompt tokens (und branch) and half image tokens (gen branch). MFU
counts 6 FLOPs per trained-and-run parameter per token for the gen half, 4 per frozen parameter for the und
half (no weight gradient), plus attention (12 * layers * width * T per token, forward and backward), against
the bf16 dense peak of the card (``--peak`` overrides the table). Medians over the timed steps are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentum.api import LatentUM
from latentum.apps.vsp import entry
from latentum.apps.vsp.evaluate import eval_maps
from latentum.config import BackboneConfig
from latentum.generation.engine import Decoder
from latentum.model.backbone import MoMEBackbone
from latentum.types import GREEDY
from latentum.worlds import frozenlake as fl

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (TFLOP/s) by card name; the first key found in the device name is used."""


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    peak = override or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def backbone_config(tiny: bool) -> BackboneConfig:
    if tiny:
        return BackboneConfig(vocab_size=512, dim=64, depth=2, heads=4, kv_heads=2, ffn_hidden=128)
    return BackboneConfig(vocab_size=32768, dim=896, depth=24, heads=14, kv_heads=2, ffn_hidden=4864,
                          rope_theta=1e6, max_seq_len=4096)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cfg: BackboneConfig, device: torch.device, batch: int, seq: int, steps: int,
                     peak: float | None) -> dict:
    """Stage-2-shaped training steps (gen branch trained, und frozen) in bf16 autocast."""
    torch.manual_seed(0)
    model = MoMEBackbone(cfg).to(device)
    model.requires_grad_(False)
    gen = list(model.branch_parameters("gen"))
    for p in gen:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(gen, lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, seq, cfg.dim, device=device)
    gen_mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    gen_mask[:, seq // 2:] = True  # a prompt, then an image to generate
    positions = torch.arange(seq, device=device).expand(batch, seq)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model(x, gen_mask, positions).hidden
            loss = hidden.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = batch * seq
    per_branch = sum(p.numel() for p in gen)
    flops = tokens / 2 * (6 * per_branch + 4 * per_branch) + 12 * cfg.depth * cfg.dim * seq * tokens
    out = {"params_total_M": sum(p.numel() for p in model.parameters()) / 1e6, "trained_M": per_branch / 1e6,
           "tokens_per_s": tokens / sec, "step_s": sec, "tflops": flops / sec / 1e12}
    if peak:
        out["mfu"] = out["tflops"] / peak
    return out


def decode_throughput(api: LatentUM, batch: int, tokens: int) -> float:
    """Greedy cached decoding of ``tokens`` text tokens per row after a short prompt: tokens/s."""
    dec = Decoder(api.model, api.tokenizer, batch, api.config.backbone.max_seq_len)
    dec.prefill([["Where is the player ?"]] * batch)
    sync(api.model.device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = dec.sample_text(GREEDY)
        dec.feed_ids(nxt[:, None])
    sync(api.model.device)
    return batch * tokens / (time.perf_counter() - t0)


def planning_throughput(api: LatentUM, maps: int, level: int) -> tuple[float, float]:
    """Plans per second for ``maps`` maps of one size: one batch of all, and one map at a time."""
    boards = [fl.render_canvas(m, m.player, "gymnasium", canvas=api.canvas) for m in eval_maps(level, maps)]
    entry.plan_batch(api, boards[:2])  # warm-up
    t0 = time.perf_counter()
    entry.plan_batch(api, boards)
    batched = maps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in boards:
        entry.plan(api, b)
    return batched, maps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny backbone: checks the script, measures nothing")
    ap.add_argument("--steps", type=int, default=200, help="timed training steps (default: 200)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--peak", type=float, default=None, help="the device's bf16 peak in TFLOP/s")
    ap.add_argument("--model", default="checkpoints/tiny", help="model for decoding and planning")
    ap.add_argument("--maps", type=int, default=16)
    args = ap.parse_args()
    device = torch.device(args.device)
    name, peak = device_peak(device, args.peak)
    seq = 64 if args.tiny else args.seq
    print(f"device: {name}; bf16 peak: {peak or 'unknown'} TFLOP/s")
    train = train_throughput(backbone_config(args.tiny), device, args.batch, seq, args.steps, peak)
    print("train (stage-2 shape, bf16 autocast): " + ", ".join(f"{k}={v:.4g}" for k, v in train.items()))
    api = LatentUM.from_pretrained(args.model, device=device)
    for b in (1, 16):
        print(f"cached greedy decoding, batch {b}: {decode_throughput(api, b, 32 if args.tiny else 128):.0f} tokens/s")
    for level in (4, 8):
        batched, single = planning_throughput(api, 4 if args.tiny else args.maps, level)
        print(f"planning {level}x{level}: batched {batched:.2f} plans/s, one at a time {single:.2f} plans/s, "
              f"ratio {batched / single:.2f}x")


if __name__ == "__main__":
    main()
