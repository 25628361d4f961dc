"""Low-memory fine-tuning: LoRA adapters (``peft``) on one backbone branch, applied from the training side.

The chosen branch's q/k/v/o projections and FFN get rank-r adapters; its own weights stay frozen and only the
adapters train. On export the adapters are saved on their own and merged into the weights, so the exported
model is a plain ``LatentUMModel`` that loads and runs without ``peft``.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from latentum.model.backbone import BRANCHES
from latentum.model.latentum import LatentUMModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "ffn.gate", "ffn.up", "ffn.down")
"""The Linear layers of a branch that can take an adapter (``Branch``)."""
ADAPTERS = "adapters.safetensors"


def add_lora(model: LatentUMModel, branch: str, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] | list[str] = TARGETS) -> LatentUMModel:
    """Wrap ``targets`` of ``branch`` ("und" or "gen") in every layer with LoRA adapters (B starts at zero, so
    the model computes exactly what it did). Which parameters train is the stage system's choice; it then calls
    ``train_adapters_only``."""
    if branch not in BRANCHES:
        raise ValueError(f"lora.branch must be one of {BRANCHES}, got {branch!r}")
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        raise ValueError(f"lora.targets: unknown layers {bad}; expected some of {list(TARGETS)}")
    i = BRANCHES.index(branch)
    pattern = rf"backbone\.layers\.\d+\.branches\.{i}\.({'|'.join(map(re.escape, targets))})"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    return model


def train_adapters_only(model: nn.Module) -> None:
    """Within every wrapped layer: the adapters train, the weight they adapt stays frozen."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.get_base_layer().requires_grad_(False)
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)


def save_adapters(model: nn.Module, folder: str | Path) -> Path:
    """The adapters alone (peft's state-dict layout) as ``folder/adapters.safetensors``."""
    path = Path(folder) / ADAPTERS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}, str(path))
    return path


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain Linear back: the model without ``peft``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())
