"""LoRA students: adapters through peft, saved in peft's format, reloaded exactly, merged into a plain model."""

from __future__ import annotations

import re

import pytest
import torch

peft = pytest.importorskip("peft")

from atod_fast.trainer.config import ConfigError, LoraSettings, TinyArch, load_train_config  # noqa: E402
from atod_fast.trainer.lora import apply_lora, is_lora, load_adapter, merged, save_adapter  # noqa: E402
from atod_fast.trainer.models import build_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["You guess a number between 1 and 31.", "Higher.", "Lower."] * 20, 300)


def base(tok):
    return tiny_llama(TinyArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok, seed=0)


def trained(tok, settings: LoraSettings, seed: int = 1):
    """A LoRA student whose B matrices are not zero (as after some training)."""
    lm = apply_lora(base(tok), settings, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=g)
    return lm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_only_the_adapters_train(tok):
    lm = apply_lora(base(tok), LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]), seed=0)
    train = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert train and all(".lora_A." in n or ".lora_B." in n for n in train)
    assert {n.split(".")[-4] for n in train} == {"q_proj", "v_proj", "o_proj"}
    assert type(lm).__name__ == "LlamaForCausalLM" and is_lora(lm)
    x = torch.randint(0, len(tok), (1, 9))
    assert torch.equal(lm(x).logits, base(tok)(x).logits)  # B starts at zero: the student starts as the base


def test_adapter_round_trip_is_exact_and_peft_reads_it(tok, tmp_path):
    s = LoraSettings(r=4, alpha=8)
    lm = trained(tok, s)
    x = torch.randint(0, len(tok), (2, 11))
    want = lm(x).logits
    save_adapter(lm, tmp_path / "a", base_name="tiny")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    again = apply_lora(base(tok), s, seed=7)  # other initial adapters: all of them are overwritten
    load_adapter(again, tmp_path / "a")
    assert torch.equal(again(x).logits, want)
    by_peft = peft.PeftModel.from_pretrained(base(tok), str(tmp_path / "a"))
    assert torch.equal(by_peft(x).logits, want)


def test_adapter_of_another_shape_is_refused(tok, tmp_path):
    save_adapter(trained(tok, LoraSettings(r=4)), tmp_path / "a", base_name=None)
    other = apply_lora(base(tok), LoraSettings(r=4, target_modules=["k_proj"]), seed=0)
    with pytest.raises(ValueError, match="does not match the student's: missing"):
        load_adapter(other, tmp_path / "a")


def test_merged_model_equals_the_lora_model(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = trained(tok, LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    x = torch.randint(0, len(tok), (2, 13))
    want = lm(x).logits.detach()
    plain = merged(lm)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path / "m")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits.detach()
    assert rel_err(got, want) < 1e-5


def test_bad_targets_and_settings_are_config_errors(tok):
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        apply_lora(base(tok), LoraSettings(r=4, target_modules=["no_such_module"]), seed=0)
    for o, key in ((["model.lora.r=-1"], "model.lora.r"), (["model.lora.dropout=1.5"], "model.lora.dropout"),
                   (["model.lora.target_modules=[]"], "model.lora.target_modules")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_train_config(None, o)


# ----------------------------------------------------------------------------- training a LoRA student
TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=4", "eval.episodes=4", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1", "eval.at_end=false",
    "model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj,up_proj]", "optim.lr=1e-2",
    # λ anneals over 3 steps in the 2-step run too (the fixed schedule): it resumes into the same run
    "schedule.handover=fixed", "schedule.total_steps=3",
]


def _files(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"a.{k}": v for k, v in load_file(str(ckpt / "student" / "adapter_model.safetensors")).items()}
    out.update({f"v.{k}": v for k, v in load_file(str(ckpt / "value_head.safetensors")).items()})
    return out


def test_lora_run_trains_resumes_exactly_evaluates_and_exports(private_cache, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from atod_fast.cli import main
    from atod_fast.trainer.lora import load_checkpoint_student

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--output-dir", str(a), "--max-steps", "3", *TINY]) == 0
    ckpt = a / "checkpoints" / "step-000003"
    assert {p.name for p in (ckpt / "student").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not list((ckpt / "student").glob("model*.safetensors"))  # the adapter only, not the base
    first = _files(a / "checkpoints" / "step-000002")
    assert any(not torch.equal(first[k], v) for k, v in _files(ckpt).items())  # the adapter trains
    assert any(k.startswith("a.") and "lora_B" in k and v.abs().sum() > 0 for k, v in first.items())

    assert main(["train", "--output-dir", str(b), "--max-steps", "2", *TINY]) == 0
    assert main(["train", "--output-dir", str(b), "--max-steps", "3", "--resume", "auto", *TINY]) == 0
    resumed = _files(b / "checkpoints" / "step-000003")
    assert resumed.keys() == _files(ckpt).keys()
    assert all(torch.equal(resumed[k], v) for k, v in _files(ckpt).items())  # bit-exact on the CPU

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(a), "--episodes", "4", "--json", "--no-compare"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3

    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(a), "--out", str(out), "--merge"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    cfg = load_train_config(str(ckpt / "config.yaml"))
    lm, tok = load_checkpoint_student(cfg, ckpt)
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        assert rel_err(plain(x).logits, lm(x).logits) < 1e-5
    assert main(["export", "--checkpoint", str(a), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", "--checkpoint", str(a), "--out", str(out)]) == 2  # never overwrites
