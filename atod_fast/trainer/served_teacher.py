"""A teacher behind an HTTP server: top-k prompt log-probs from vLLM's completions API.

For each trajectory the trainer already holds the token ids; the server is asked to score them
(``prompt`` = the ids, ``prompt_logprobs`` = k, ``max_tokens`` = 1, ``temperature`` = the loss's
temperature). Entry p + 1 of ``prompt_logprobs`` is the teacher's distribution of token p + 1, so
the row at position p (whose hidden state predicts an agent token) reads it.

The loss's sparse teacher gets K = k + 1 columns per agent token: the teacher's k most likely ids,
then the sampled token when it is not among them (the server always reports it). When it is among
them the last column is padding (the sampled id with log-prob −inf, which contributes nothing). The
loss renormalizes the teacher over these ids, so the sampled token always has teacher mass in it.

Requests run concurrently (at most ``max_inflight``) through aiohttp. A request that fails (no
connection, HTTP 5xx or 429, a timeout) is retried with exponential backoff; one that still fails
raises :class:`TeacherUnavailable`, after which the trainer skips the step. A response of the wrong
shape raises :class:`TeacherResponseError` naming what was wrong: retrying would not fix it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import torch

from .config import ConfigError


class TeacherUnavailable(RuntimeError):
    """The teacher server did not answer a request within its retries."""


class TeacherResponseError(ValueError):
    """The teacher server answered with something other than the expected prompt log-probs."""


class _Retryable(Exception):
    pass


def _aiohttp():
    try:
        import aiohttp
    except ImportError:
        raise ConfigError("model.teacher_server: the served teacher needs aiohttp: pip install 'atod-fast[serve]'") \
            from None
    return aiohttp


@dataclass
class SparseRows:
    """The teacher's sparse distribution on some positions of one trajectory."""

    ids: torch.Tensor        # [n, k + 1] int64
    logprobs: torch.Tensor   # [n, k + 1] float32, -inf on padding
    sampled: torch.Tensor    # [n] float32: log p_teacher of the token that follows each position


def _entry_logprob(entry: dict, key: str, where: str) -> float:
    v = entry[key]
    lp = v.get("logprob") if isinstance(v, dict) else None
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or math.isnan(lp) or lp > 1e-3:
        raise TeacherResponseError(f"{where}[{key!r}].logprob: expected a log-probability (a number <= 0), "
                                   f"got {v!r}")
    return float(lp)


def parse_prompt_logprobs(body, ids: list[int], positions: list[int], k: int, vocab: int) -> SparseRows:
    """Top-k ids and log-probs at ``positions`` (each predicts the token after it) of one completions response."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"] \
            or not isinstance(body["choices"][0], dict):
        raise TeacherResponseError(f"expected a JSON object with a non-empty 'choices' list, got {str(body)[:200]!r}")
    plp = body["choices"][0].get("prompt_logprobs")
    if not isinstance(plp, list):
        raise TeacherResponseError("choices[0].prompt_logprobs: expected a list (is prompt_logprobs supported by "
                                   f"this server?), got {str(plp)[:100]!r}")
    if len(plp) != len(ids):
        raise TeacherResponseError(f"choices[0].prompt_logprobs: {len(plp)} entries for a prompt of {len(ids)} "
                                   "tokens (expected one per prompt token)")
    n = len(positions)
    out_ids = torch.zeros(n, k + 1, dtype=torch.long)
    out_lp = torch.full((n, k + 1), -math.inf)
    sampled = torch.empty(n)
    for r, p in enumerate(positions):
        where = f"choices[0].prompt_logprobs[{p + 1}]"
        entry, tok = plp[p + 1], ids[p + 1]
        if not isinstance(entry, dict):
            raise TeacherResponseError(f"{where}: expected a map from token id to log-prob, got {str(entry)[:100]!r}")
        if str(tok) not in entry:
            raise TeacherResponseError(f"{where}: the prompt's own token {tok} is missing")
        if len(entry) < k:
            raise TeacherResponseError(f"{where}: {len(entry)} entries, expected the top {k} (model.teacher_topk) "
                                       "and the prompt's token")
        scored = []
        for key in entry:
            if not key.lstrip("-").isdigit():
                raise TeacherResponseError(f"{where}: key {key!r} is not a token id")
            scored.append((_entry_logprob(entry, key, where), int(key)))
        scored.sort(key=lambda x: -x[0])
        own = _entry_logprob(entry, str(tok), where)
        sampled[r] = own
        top = scored[:k]
        out_ids[r].fill_(tok)
        for c, (lp, i) in enumerate(top):
            if 0 <= i < vocab:  # ids past the student's vocabulary (padded heads) stay padding
                out_ids[r, c], out_lp[r, c] = i, lp
        if all(i != tok for _, i in top):
            out_lp[r, k] = own
    return SparseRows(out_ids, out_lp, sampled)


class ServedTeacher:
    """Scores token sequences with a teacher behind ``url`` (``vllm serve`` or ``atod-fast serve-teacher``)."""

    def __init__(self, url: str, *, topk: int, temperature: float, timeout_s: float, retries: int,
                 max_inflight: int, vocab_size: int, backoff_s: float = 0.5, sampled: bool = False):
        self.aiohttp = _aiohttp()
        self.url = url.rstrip("/")
        self.topk, self.temperature, self.vocab, self.sampled = topk, temperature, vocab_size, sampled
        self.timeout_s, self.retries, self.max_inflight, self.backoff_s = timeout_s, retries, max_inflight, backoff_s
        self.model: str | None = None

    # ----------------------------------------------------------------- requests
    def _session(self):
        return self.aiohttp.ClientSession(timeout=self.aiohttp.ClientTimeout(total=self.timeout_s))

    async def _post_once(self, session, path: str, body: dict):
        try:
            async with session.post(self.url + path, json=body) as r:
                text = await r.text()
        except (self.aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        if r.status >= 500 or r.status == 429:
            raise _Retryable(f"HTTP {r.status}: {text[:200]}")
        return r.status, text

    async def _post(self, session, sem, path: str, body: dict):
        """(status, text) of a POST, retried with exponential backoff; TeacherUnavailable once retries run out."""
        for attempt in range(self.retries + 1):
            try:
                async with sem:
                    return await self._post_once(session, path, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise TeacherUnavailable(f"teacher server {self.url}{path}: {e} (after {self.retries} "
                                             "retries)") from None
                await asyncio.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _body(self, ids: list[int], k: int, temperature: float) -> dict:
        body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": k, "temperature": temperature}
        if self.model is not None:
            body["model"] = self.model
        return body

    @staticmethod
    def _json(status: int, text: str, what: str):
        import json

        if status != 200:
            raise TeacherResponseError(f"{what}: HTTP {status}: {text[:300]}")
        try:
            return json.loads(text)
        except ValueError:
            raise TeacherResponseError(f"{what}: the response is not JSON: {text[:200]!r}") from None

    async def _score_all(self, seqs: list[list[int]], positions: list[list[int]], k: int, temperature: float):
        sem = asyncio.Semaphore(self.max_inflight)
        async with self._session() as session:
            async def one(ids, pos):
                status, text = await self._post(session, sem, "/v1/completions", self._body(ids, k, temperature))
                return parse_prompt_logprobs(self._json(status, text, f"teacher server {self.url}"), ids, pos, k,
                                             self.vocab)

            res = await asyncio.gather(*(one(s, p) for s, p in zip(seqs, positions, strict=True)),
                                       return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException):
                raise r
        return res

    # ----------------------------------------------------------------- the trainer's teacher scorer
    def score(self, batch) -> dict[str, torch.Tensor]:
        """The sparse teacher on the agent rows of a step batch (``teacher_topk_ids``, ``teacher_topk_logprobs``,
        [A, k + 1], on the batch's device), or with ``sampled`` the sampled tokens' own log-probs
        (``teacher_logprobs``, [A]); TeacherUnavailable when the server does not answer."""
        ids = batch.packed.input_ids.cpu()
        cu = batch.packed.cu_seqlens.cpu().tolist()
        rows = batch.agent_rows.cpu()
        seqs, positions = [], []
        for b in range(len(cu) - 1):
            seqs.append(ids[cu[b]:cu[b + 1]].tolist())
            positions.append((rows[(rows >= cu[b]) & (rows < cu[b + 1])] - cu[b]).tolist())
        out = self.score_sequences(seqs, positions)
        keys = ("teacher_logprobs",) if self.sampled else ("teacher_topk_ids", "teacher_topk_logprobs")
        return {k: out[k].to(batch.device) for k in keys}

    def head(self) -> tuple[None, None]:
        return None, None

    def gathered(self):
        import contextlib

        return contextlib.nullcontext()

    def score_sequences(self, seqs: list[list[int]], positions: list[list[int]]) -> dict[str, torch.Tensor]:
        """The sparse teacher on ``positions[b]`` of every sequence ``seqs[b]``, concatenated in that order.

        Returns ``teacher_topk_ids`` and ``teacher_topk_logprobs`` ([A, k + 1]) and ``teacher_logprobs`` ([A],
        the sampled tokens' own log-probs).
        """
        rows = asyncio.run(self._score_all(seqs, positions, self.topk, self.temperature))
        return {"teacher_topk_ids": torch.cat([r.ids for r in rows]),
                "teacher_topk_logprobs": torch.cat([r.logprobs for r in rows]),
                "teacher_logprobs": torch.cat([r.sampled for r in rows])}

    # ----------------------------------------------------------------- start-up checks
    def connect(self, tokenizer, probe_text: str) -> None:
        """Reach the server and check it against the student: ConfigError naming the URL when it is down, refuses
        k, tokenizes differently or ignores the temperature."""
        asyncio.run(self._connect(tokenizer, probe_text))

    async def _connect(self, tokenizer, probe_text: str) -> None:
        key = f"model.teacher_server: {self.url}"
        async with self._session() as session:
            try:
                async with session.get(self.url + "/v1/models") as r:
                    status, text = r.status, await r.text()
            except (self.aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise ConfigError(f"{key} does not answer ({type(e).__name__}: {e}); start the teacher server first "
                                  "(atod-fast serve-teacher or vllm serve)") from None
            try:
                self.model = self._json(status, text, "GET /v1/models")["data"][0]["id"]
            except (TeacherResponseError, KeyError, IndexError, TypeError) as e:
                raise ConfigError(f"{key}: /v1/models does not list a model: {e}") from None
            ids = tokenizer(probe_text, add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                raise ValueError(f"the tokenizer probe {probe_text!r} must be at least 2 tokens long")
            sem = asyncio.Semaphore(1)
            await self._check_tokenizer(session, sem, tokenizer, probe_text, ids, key)
            rows = await self._probe(session, sem, ids, self.temperature, key)
            if self.temperature != 1.0:
                plain = await self._probe(session, sem, ids, 1.0, key)
                if torch.allclose(rows.sampled, plain.sampled, atol=1e-6):
                    raise ConfigError(f"{key} returns the same log-probs at temperature {self.temperature} as at 1: "
                                      "it ignores the temperature (vllm serve needs --logprobs-mode "
                                      "processed_logprobs); or set loss.temperature=1")

    async def _probe(self, session, sem, ids: list[int], temperature: float, key: str) -> SparseRows:
        try:
            status, text = await self._post(session, sem, "/v1/completions", self._body(ids, self.topk, temperature))
        except TeacherUnavailable as e:
            raise ConfigError(f"{key}: scoring a probe failed: {e}") from None
        if status == 400:
            raise ConfigError(f"{key} refuses prompt_logprobs={self.topk} (model.teacher_topk): {text[:300]} "
                              "(vllm serve: raise --max-logprobs)")
        try:
            return parse_prompt_logprobs(self._json(status, text, "probe"), ids, list(range(len(ids) - 1)),
                                         self.topk, self.vocab)
        except TeacherResponseError as e:
            raise ConfigError(f"{key}: scoring a probe: {e}") from None

    async def _check_tokenizer(self, session, sem, tokenizer, text: str, ids: list[int], key: str) -> None:
        """The server's token ids of ``text`` must be the student's; servers without /tokenize are compared on the
        decoded text of each probe token."""
        body = {"prompt": text, "add_special_tokens": False}
        if self.model is not None:
            body["model"] = self.model
        try:
            status, raw = await self._post(session, sem, "/tokenize", body)
        except TeacherUnavailable as e:
            raise ConfigError(f"{key}: /tokenize failed: {e}") from None
        if status == 200:
            theirs = self._json(status, raw, "/tokenize").get("tokens")
        else:  # no /tokenize: the decoded tokens of a scored probe must read as the student's
            try:
                status, raw = await self._post(session, sem, "/v1/completions", self._body(ids, 0, 1.0))
                plp = self._json(status, raw, "probe")["choices"][0]["prompt_logprobs"]
                theirs = [i if plp[p][str(i)].get("decoded_token") == tokenizer.decode([i]) else None
                          for p, i in enumerate(ids) if p > 0]
            except (TeacherUnavailable, TeacherResponseError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise ConfigError(f"{key}: scoring a probe failed: {e}") from None
            ids = ids[1:]
        if theirs != ids:
            raise ConfigError(f"{key}: the teacher's tokenizer differs from the student's: the probe {text[:60]!r} is "
                              f"{str(theirs)[:120]} there and {str(ids)[:120]} for the student; token-level "
                              "distillation needs one tokenizer")


def probe_text(tokenizer) -> str:
    """Text whose token ids the teacher server must give as the student does: words, digits, punctuation, accents,
    whitespace, and the end-of-turn token (special tokens differ between model families)."""
    return "Guess a number between 1 and 31: 16? Higher. (x+y)/2 = 24; naïve café — ok!\n\t" + \
        (tokenizer.eos_token or "")


def served_teacher(cfg, tokenizer, probe_text: str) -> ServedTeacher:
    """The ServedTeacher of a train config (``model.teacher_*``, ``loss.temperature``), checked against the
    student's tokenizer."""
    m = cfg.model
    teacher = ServedTeacher(m.teacher_server, topk=m.teacher_topk, temperature=cfg.loss.temperature,
                            timeout_s=m.teacher_timeout_s, retries=m.teacher_retries,
                            max_inflight=m.teacher_max_inflight, vocab_size=len(tokenizer),
                            sampled=cfg.loss.divergence == "sampled_reverse_kl")
    teacher.connect(tokenizer, probe_text)
    return teacher
