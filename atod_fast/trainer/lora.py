"""LoRA students (peft): adapters injected into the student's linear layers; only they (and the value head) train.

peft injects its LoRA layers into the model in place, so the student stays the same causal LM
class (its backbone, head and ``generate`` are used as for a full student) with the base weights
frozen. Checkpoints hold the adapter in peft's own format, so ``PeftModel.from_pretrained(base,
folder)`` reads it as well:

    student/adapter_model.safetensors   the LoRA weights (keys as peft saves them)
    student/adapter_config.json         the LoraConfig

The base weights are not saved: the run rebuilds them from its config (``model.student``: a
model folder or hub name, or the built-in student, deterministic in the seed). A merged
transformers folder (base + scaled BA) is written by :func:`save_merged`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, LoraSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # peft's name of the one adapter


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora.r: LoRA students need peft: pip install 'atod-fast[lora]'") from None
    return peft


def lora_config(s: LoraSettings, base_name: str | None = None):
    return _peft().LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                              task_type="CAUSAL_LM", base_model_name_or_path=base_name)


def apply_lora(lm: nn.Module, s: LoraSettings, *, seed: int) -> nn.Module:
    """Adapters injected into ``lm`` in place (base weights frozen, adapters initialized from ``seed``); ``lm``."""
    peft = _peft()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft.get_peft_model(lm, lora_config(s))
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None
    if not is_lora(lm):
        raise ConfigError("model.lora.target_modules: no module of the student got an adapter")
    return lm


def is_lora(lm: nn.Module) -> bool:
    return any(".lora_A." in k for k, _ in lm.named_parameters())


def _to_peft_key(name: str) -> str:
    """The injected parameter's name -> the key peft's save_pretrained writes for it."""
    return "base_model.model." + name.replace(f".{_ADAPTER}.", ".")


def _from_peft_key(key: str) -> str:
    name = key.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        name = name.replace(f".{part}.", f".{part}.{_ADAPTER}.")
    return name


def adapter_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's keys (CPU, contiguous)."""
    return {_to_peft_key(k): v.detach().cpu().contiguous() for k, v in lm.state_dict().items() if ".lora_" in k}


def save_adapter(lm: nn.Module, folder: Path, *, base_name: str | None, state: dict | None = None) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` of ``lm``'s adapter into ``folder``.

    ``state``: ``lm``'s full state dict when its live parameters are shards (ZeRO-3); null: read ``lm``.
    """
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(lm) if state is None else {
        _to_peft_key(k): v.detach().cpu().contiguous() for k, v in state.items() if ".lora_" in k}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.copy(lm.peft_config[_ADAPTER])
    cfg.base_model_name_or_path = base_name
    cfg.save_pretrained(str(folder))


def load_adapter(lm: nn.Module, folder: Path) -> None:
    """The adapter saved in ``folder`` into ``lm`` (which has the same adapters injected); every key must match."""
    from safetensors.torch import load_file

    state = {_from_peft_key(k): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    mine = {k for k in lm.state_dict() if ".lora_" in k}
    if set(state) != mine:
        raise ValueError(f"the adapter in {folder} does not match the student's: missing "
                         f"{sorted(mine - set(state))[:3]}, unexpected {sorted(set(state) - mine)[:3]}")
    lm.load_state_dict(state, strict=False)


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_WEIGHTS).is_file()


def merged(lm: nn.Module) -> nn.Module:
    """``lm`` with every adapter folded into its base weights and removed (in place): a plain transformers model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.get_base_layer())
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


def save_merged(lm: nn.Module, tokenizer, folder: Path) -> Path:
    """A merged transformers folder (safetensors, config and tokenizer) of a LoRA student."""
    model = merged(lm)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_checkpoint_student(cfg, ckpt: Path, *, progress: bool = False):
    """(lm, tokenizer) of a checkpoint's student: its transformers folder, or for a LoRA checkpoint the base the run
    was built on (rebuilt from its config) with the saved adapter."""
    from transformers import AutoTokenizer

    from .loading import initial_student, teacher_location
    from .models import load_causal_lm

    folder = Path(ckpt) / "student"
    if not has_adapter(folder):
        return load_causal_lm(str(folder), dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    lm, _ = initial_student(cfg, teacher_location(cfg, progress=progress))
    apply_lora(lm, cfg.model.lora, seed=cfg.seed)
    load_adapter(lm, folder)
    return lm, AutoTokenizer.from_pretrained(str(folder))
