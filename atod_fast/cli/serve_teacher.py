"""``atod-fast serve-teacher``: a transformers model behind the scoring subset of vLLM's completions API.

A teacher too large to sit beside the student is served by ``vllm serve`` on its own GPU; this
server answers the same requests for a transformers model on a CPU (or one GPU), for small
setups and for the tests. Endpoints, shaped as vLLM's:

- ``GET /health``: 200 once the model is loaded.
- ``GET /v1/models``: the one served model.
- ``POST /tokenize``: ``{"prompt": text, "add_special_tokens": bool}`` -> ``{"tokens": [...], "count": n}``.
- ``POST /v1/completions``: ``prompt`` a list of token ids, ``max_tokens`` 0 or 1, ``prompt_logprobs`` k,
  ``temperature``. ``choices[0].prompt_logprobs`` holds one entry per prompt position: the first
  ``null``, every other a map from token id (a string) to ``{logprob, rank, decoded_token}`` with the
  k most likely ids at that position plus the prompt's own token (k + 1 entries when it is not among
  them). Log-probs are those of softmax(logits / temperature), as vLLM's ``processed_logprobs`` mode
  gives them; ``rank`` is 1 for the most likely id.

With ``max_tokens=1`` the one completion token is the most likely next id (scoring clients ignore it).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import torch

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class BadRequest(ValueError):
    """A request this server refuses (HTTP 400, with the message)."""


class PromptScorer:
    """One causal LM and its tokenizer; scores token-id prompts, one forward at a time."""

    def __init__(self, lm, tokenizer, *, name: str, max_logprobs: int = DEFAULT_MAX_LOGPROBS):
        self.lm, self.tokenizer, self.name, self.max_logprobs = lm.eval(), tokenizer, name, max_logprobs
        self.vocab = lm.get_output_embeddings().weight.shape[0]
        self.max_len = getattr(lm.config, "max_position_embeddings", None)
        self.device = next(lm.parameters()).device
        self._lock = threading.Lock()  # one model: forwards run one after another
        self._decoded: dict[int, str] = {}

    def decoded(self, i: int) -> str:
        s = self._decoded.get(i)
        if s is None:
            s = self._decoded[i] = self.tokenizer.decode([i])
        return s

    def check(self, body: dict) -> tuple[list[int], int, float, int]:
        """(prompt ids, k, temperature, max_tokens) of a completions request, or BadRequest naming the field."""
        model = body.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"model: this server serves {self.name!r}, not {model!r}")
        ids = body.get("prompt")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in ids):
            raise BadRequest("prompt: expected a non-empty list of token ids (text prompts are not served)")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise BadRequest(f"prompt: token id {bad[0]} is outside the model's vocabulary [0, {self.vocab})")
        if self.max_len is not None and len(ids) > self.max_len:
            raise BadRequest(f"prompt: {len(ids)} tokens exceed the model's context of {self.max_len}")
        k = body.get("prompt_logprobs")
        if not (isinstance(k, int) and not isinstance(k, bool)) or not 0 <= k <= self.max_logprobs:
            raise BadRequest(f"prompt_logprobs: expected an integer in [0, {self.max_logprobs}] (--max-logprobs), "
                             f"got {k!r}")
        t = body.get("temperature", 1.0)
        if t is None:
            t = 1.0
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise BadRequest(f"temperature: expected a number > 0, got {t!r}")
        n = body.get("max_tokens", 1)
        if n not in (0, 1) or isinstance(n, bool):
            raise BadRequest(f"max_tokens: this server only scores prompts; expected 0 or 1, got {n!r}")
        return ids, k, float(t), n

    @torch.no_grad()
    def score(self, ids: list[int], k: int, temperature: float) -> tuple[list, int]:
        """(prompt_logprobs, most likely next id) of one prompt."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self._lock:
            logits = self.lm(input_ids=x, use_cache=False).logits[0].float()
        nxt = int(logits[-1].argmax())
        logp = torch.log_softmax(logits[:-1] / temperature, dim=-1)
        actual = x[0, 1:]
        own = logp.gather(1, actual[:, None]).squeeze(1)
        rank = (logp > own[:, None]).sum(-1) + 1
        top_lp, top_id = logp.topk(k, dim=-1)
        own, rank, top_lp, top_id = own.tolist(), rank.tolist(), top_lp.tolist(), top_id.tolist()
        out: list = [None]
        for p, a in enumerate(ids[1:]):
            entry = {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": self.decoded(i)}
                     for r, (i, lp) in enumerate(zip(top_id[p], top_lp[p], strict=True))}
            entry.setdefault(str(a), {"logprob": own[p], "rank": rank[p], "decoded_token": self.decoded(a)})
            out.append(entry)
        return out, nxt

    def completion(self, body: dict) -> dict:
        ids, k, t, n = self.check(body)
        plp, nxt = self.score(ids, k, t)
        text = self.decoded(nxt) if n else ""
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": plp}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        }


def _error(status: int, message: str, kind: str = "BadRequestError"):
    from aiohttp import web

    return web.json_response({"object": "error", "message": message, "type": kind, "param": None,
                              "code": status}, status=status)


def build_app(scorer: PromptScorer):
    """The aiohttp application serving ``scorer``."""
    from aiohttp import web

    async def health(_):
        return web.Response(status=200)

    async def models(_):
        return web.json_response({"object": "list", "data": [
            {"id": scorer.name, "object": "model", "created": 0, "owned_by": "atod-fast", "root": scorer.name,
             "max_model_len": scorer.max_len}]})

    async def body_of(request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def tokenize(request):
        try:
            body = await body_of(request)
            text = body.get("prompt")
            if not isinstance(text, str):
                raise BadRequest("prompt: expected a string")
        except BadRequest as e:
            return _error(400, str(e))
        ids = scorer.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": scorer.max_len})

    async def completions(request):
        try:
            body = await body_of(request)
            return web.json_response(await asyncio.to_thread(scorer.completion, body))
        except BadRequest as e:
            return _error(400, str(e))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.get("/health", health), web.get("/v1/models", models), web.post("/tokenize", tokenize),
                    web.post("/v1/completions", completions)])
    return app


def load_scorer(model: str, *, name: str | None, config: str | None, overrides: list[str], device: str,
                dtype: str, max_logprobs: int) -> PromptScorer:
    """The scorer for ``--model``: a path or hub name, or ``builtin`` (the built-in teacher of the train config)."""
    from ..trainer.config import BUILTIN, load_train_config
    from ..trainer.models import load_causal_lm

    cfg = load_train_config(config, overrides)
    path = model
    if model == BUILTIN:
        from ..trainer.sft import builtin_teacher

        path = str(builtin_teacher(cfg.env, cfg.sft, device="cpu", progress=False))
    lm, tok = load_causal_lm(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return PromptScorer(lm.to(device), tok, name=name or model, max_logprobs=max_logprobs)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve-teacher", help="serve a teacher's prompt log-probs over HTTP (vLLM's completions API)",
                       description="Serve a transformers model's prompt log-probs with the request and response "
                       "shape of `vllm serve` (POST /v1/completions with token-id prompts and prompt_logprobs=k), "
                       "for model.teacher_server. Needs the serve extra: pip install 'atod-fast[serve]'.")
    p.add_argument("--model", required=True, metavar="PATH|builtin",
                   help="a transformers model folder or hub name, or builtin (the built-in teacher of the config)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--served-model-name", help="name in /v1/models and requests (default: --model)")
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help=f"largest prompt_logprobs a request may ask for (default: {DEFAULT_MAX_LOGPROBS}, as vLLM)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype")
    p.add_argument("--config", metavar="FILE.yaml", help="train config naming the environment of --model builtin")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="train config overrides (e.g. env.name)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import logging
    import sys

    try:
        from aiohttp import web
    except ImportError:
        print("atod-fast: error: serve-teacher needs aiohttp: pip install 'atod-fast[serve]'", file=sys.stderr)
        return 2
    from ..trainer.config import ConfigError

    if not 0 < args.port < 65536:
        print(f"atod-fast: error: --port: expected 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_logprobs < 0:
        print(f"atod-fast: error: --max-logprobs: expected >= 0, got {args.max_logprobs}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scorer = load_scorer(args.model, name=args.served_model_name, config=args.config,
                             overrides=list(args.overrides), device=args.device, dtype=args.dtype,
                             max_logprobs=args.max_logprobs)
    except (ConfigError, ValueError) as e:
        print(f"atod-fast: error: {e}", file=sys.stderr)
        return 2
    print(f"serving {scorer.name} on http://{args.host}:{args.port} (vocabulary {scorer.vocab}, "
          f"device {scorer.device})", flush=True)
    web.run_app(build_app(scorer), host=args.host, port=args.port, print=None)
    return 0
