"""Models: the built-in tokenizer and tiny Llamas, hub/path loading, and the student's value head.

The student is any causal LM plus a scalar value head on its last hidden state (shared
backbone, separate policy and value heads). Teacher and reference are frozen causal LMs over
the same tokenizer. Everything the embedded default needs is built in-process: a byte-level
BPE tokenizer trained on expert transcripts, with a small chat template, and random-init
``LlamaConfig`` models. Nothing is downloaded unless a config names a hub model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from pickle import UnpicklingError  # raised by torch's restricted loader; nothing here unpickles

import torch
from torch import nn

from .config import ConfigError, TinyArch

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus`` (any text stays encodable), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(arch: TinyArch, tokenizer, seed: int):
    """A random-init Llama sized by ``arch`` over ``tokenizer`` (deterministic in ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size, max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, attention_dropout=0.0,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   gguf_file: str | None = None, attn_implementation: str | None = None):
    """(model, tokenizer) from a hub name or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    model_kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype], **kw, **model_kw)
    except OSError as e:
        raise ValueError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
    except UnpicklingError:  # transformers reads *.bin weights with torch.load(weights_only=True)
        raise ValueError(f"cannot load model {name_or_path!r}: its weights file is a pickle holding more than "
                         "tensors; refused, since loading it could run code (safetensors weights are safe)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    unsupported = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(model.config, k, None)]
    if unsupported:
        raise ValueError(f"model {name_or_path!r} transforms its logits ({', '.join(unsupported)}), which the "
                         "hidden-state loss does not reproduce")
    return model, tokenizer


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(key: str, value: str) -> None:
    """A ConfigError naming ``key`` when ``value`` is neither a model folder here nor a hub model within reach.

    Run before any model loads: transformers would otherwise retry the hub for a minute, then raise a
    chained error that names no config key. A path that does not exist fails at once; a hub name fails
    when it is not in the local cache and the hub is off (HF_HUB_OFFLINE=1), unreachable, or without it.
    """
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {value} holds no config.json; expected a transformers model folder "
                              "(saved with save_pretrained) or a hub model name")
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ConfigError(f"{key}: no such directory: {value}") from None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return
    if _hub_offline():
        raise ConfigError(f"{key}: {value!r} is neither a local directory nor in the Hugging Face cache, and "
                          "HF_HUB_OFFLINE=1 forbids downloading it")
    _probe_hub(key, value)


def _probe_hub(key: str, name: str) -> None:
    """One request, no retries: whether the hub holds ``name`` (any other answer is left to the loader)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {name!r} is neither a local directory nor a model on the Hugging Face hub "
                          "(private models need `hf auth login`)") from None
    except HfHubHTTPError:
        return  # gated, rate-limited, server trouble: the loader reports it with its own words
    except Exception as e:  # any transport failure: DNS, refused, timeout, proxy
        raise ConfigError(f"{key}: {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); download "
                          "it where there is network, or give a local path") from None


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def check_same_tokenizer(student_tok, other_tok, student_name: str, other_name: str, role: str) -> None:
    """Distillation compares distributions over token ids: both models must use one tokenizer."""
    if not same_tokenizer(student_tok, other_tok):
        raise ValueError(
            f"model.{role} ({other_name}) uses a different tokenizer than model.student ({student_name}): "
            f"vocabularies of {len(other_tok)} and {len(student_tok)} tokens differ; token-level distillation "
            "needs the same tokenizer (pick a teacher of the student's model family)")


def decoder_of(lm: nn.Module) -> nn.Module:
    """The backbone that returns last hidden states (after the final norm) without the LM head."""
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise ValueError(f"{type(lm).__name__} exposes no base model for its last hidden states")
    return base


def lm_head(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class ValueHead(nn.Module):
    """Scalar value V(s) from the last hidden state: a linear layer, zero-initialized."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[...]`` float32."""
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


class Policy(nn.Module):
    """Student: a causal LM (policy head) and a value head sharing its backbone."""

    def __init__(self, lm: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head or ValueHead(lm.config.hidden_size)

    def forward(self, packed, rows: torch.Tensor, *, packing: str, autocast: bool, loss_fn):
        """``loss_fn(hidden [R, H], values [R], head_weight, head_bias)`` on the last hidden states of ``rows``.

        The loss is computed inside the forward so that data-parallel wrappers see all of it:
        DDP prepares its gradient reduction here and ZeRO-3 keeps the LM head's weight gathered
        through the fused loss's forward and backward.
        """
        from .packing import last_hidden_states

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = last_hidden_states(decoder_of(self.lm), packed, mode=packing)[rows]
        w, b = lm_head(self.lm)
        return loss_fn(hidden, self.value_head(hidden), w, b)


def save_value_head(head: ValueHead, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_value_head(head: ValueHead, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(path)))


def apply_liger(lm: nn.Module) -> None:
    """Liger-Kernel's fused RMSNorm, RoPE and SwiGLU in ``lm`` (in place). Its cross-entropy patches stay off: the
    LM head belongs to the fused ATOD loss, which reads the head's weight and never materializes logits."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError("model.liger: liger-kernel is not installed (pip install liger-kernel; it needs CUDA)") \
            from None
    if not torch.cuda.is_available():
        raise ConfigError("model.liger: Liger-Kernel's Triton kernels need CUDA; set model.liger=false on the CPU")
    _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
