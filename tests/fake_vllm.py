"""A stand-in for the part of vLLM's offline API that ``atod_fast.trainer.vllm_rollout`` calls, for CPU tests.

It implements only that surface, with vLLM's names and semantics as documented: ``LLM(model,
**engine_args)`` (unknown arguments refused), ``LLM.generate`` over ``{"prompt_token_ids": ...}``
prompts with one ``SamplingParams`` per prompt (sampling fields checked by name),
``outputs[0].token_ids`` ending with the stop id that ended them and
``outputs[0].logprobs[k][token_id].logprob`` after temperature scaling, ``collective_rpc`` onto a
worker whose class mixes in ``worker_extension_cls`` and whose ``model_runner.model.load_weights``
takes ``(HF name, tensor)`` pairs (unknown names raise, like vLLM's loaders) and returns the names
it loaded, and ``reset_prefix_cache``. The model is a real transformers model built from the
folder's config: randomly initialized under ``load_format="dummy"``, as vLLM's dummy loader does.
Sampling with a seed uses a private ``torch.Generator`` per request (vLLM's per-request seeds).
Everything the glue passes is recorded for the tests to inspect.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from types import SimpleNamespace

import torch

SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens",
    "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens", "include_stop_str_in_output",
}
ENGINE_ARGS = {
    "tensor_parallel_size", "distributed_executor_backend", "worker_extension_cls", "load_format", "dtype",
    "gpu_memory_utilization", "max_model_len", "seed", "logprobs_mode", "trust_remote_code", "enable_sleep_mode",
    "enforce_eager", "enable_prefix_caching",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.temperature = 1.0
        self.max_tokens = 16
        self.stop_token_ids = None
        self.seed = None
        self.logprobs = None
        self.detokenize = True
        self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        for k, v in kwargs.items():
            setattr(self, k, v)


class _ModelRunnerModel:
    """What ``worker.model_runner.model`` offers the extension: ``load_weights`` and ``named_parameters``."""

    def __init__(self, hf):
        self.hf = hf
        self.received: list[list[str]] = []  # the names of every load_weights call

    def named_parameters(self):
        return self.hf.named_parameters()

    @torch.no_grad()
    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        names = []
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"no parameter {name!r} in the model")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            names.append(name)
        self.received.append(names)
        return set(names)


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            # what vLLM's external-launcher executor needs from its environment
            assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
            for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                assert k in os.environ, k
        self.model, self.kwargs = model, kwargs
        config = AutoConfig.from_pretrained(model, trust_remote_code=kwargs.get("trust_remote_code", False))
        if kwargs.get("load_format") == "dummy":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                hf = AutoModelForCausalLM.from_config(config)
        else:
            hf = AutoModelForCausalLM.from_pretrained(model)
        self.hf = hf.to(_DTYPES[kwargs.get("dtype", "float32")]).eval()
        module, _, name = kwargs["worker_extension_cls"].rpartition(".")
        extension = getattr(importlib.import_module(module), name)
        self.worker = type("Worker", (extension,), {})()
        self.worker.model_runner = SimpleNamespace(model=_ModelRunnerModel(self.hf))
        self.requests: list[tuple[list[int], SamplingParams, list[int]]] = []  # (prompt, params, sampled ids)
        self.rpc_calls: list[str] = []
        self.prefix_cache_resets = 0
        INSTANCES.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc_calls.append(method)
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        if not isinstance(sampling_params, (list, tuple)):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("the lengths of prompts and sampling_params must be the same")
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def _one(self, prompt: list[int], sp: SamplingParams):
        max_len = self.kwargs.get("max_model_len") or 10**9
        if len(prompt) > max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than max_model_len={max_len}")
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        stop = set(sp.stop_token_ids or ())
        ids, out, logprobs = list(prompt), [], []
        for _ in range(sp.max_tokens):
            if len(ids) >= max_len:
                break
            logits = self.hf(torch.tensor([ids])).logits[0, -1].float()
            if sp.temperature > 0:
                logits = logits / sp.temperature
                tok = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            else:
                tok = int(logits.argmax())
            lp = float(torch.log_softmax(logits, -1)[tok])
            out.append(tok)
            logprobs.append({tok: SimpleNamespace(logprob=lp, rank=1, decoded_token=None)})
            ids.append(tok)
            if tok in stop:
                break
        self.requests.append((list(prompt), sp, list(out)))
        completion = SimpleNamespace(token_ids=out, logprobs=logprobs if sp.logprobs is not None else None,
                                     text=None, finish_reason="stop" if out and out[-1] in stop else "length")
        return SimpleNamespace(prompt_token_ids=list(prompt), outputs=[completion])


INSTANCES: list[LLM] = []


def install(monkeypatch) -> types.ModuleType:
    """Puts this stand-in in ``sys.modules["vllm"]`` for one test; the environment it sets is restored after."""
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # records the original value, restored at teardown
        monkeypatch.delenv(k)
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    INSTANCES.clear()
    return module
