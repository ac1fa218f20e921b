"""A teacher server that misbehaves on demand, for the served-teacher failure tests.

It is ``atod-fast serve-teacher``'s own application with one middleware in front of
``/v1/completions``; ``POST /fault {"mode": ..., "count": n}`` sets what the next completions do:

- ``ok``: answer normally;
- ``garbage``: HTTP 200 with a body that is not JSON;
- ``short``: HTTP 200 with ``prompt_logprobs`` one entry short;
- ``slow``: sleep ``seconds`` before answering (past the client's timeout);
- ``fail``: HTTP 503 for the next ``count`` requests, then answer normally;
- ``blind``: ignore the request's temperature (as a server without processed log-probs does);
- ``no-tokenize``: answer 404 on ``/tokenize`` (a server without it).

Run: ``python tests/teacher_fault_server.py MODEL_PATH PORT``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from atod_fast.cli.serve_teacher import PromptScorer, build_app
from atod_fast.trainer.models import load_causal_lm


def main(path: str, port: int) -> None:
    lm, tok = load_causal_lm(path)
    scorer = PromptScorer(lm, tok, name="faulty")
    app = build_app(scorer)
    state = {"mode": "ok", "count": 0, "seconds": 0.0}

    async def fault(request):
        state.update(await request.json())
        return web.json_response(state)

    @web.middleware
    async def misbehave(request, handler):
        mode = state["mode"]
        if request.path == "/tokenize" and mode == "no-tokenize":
            return web.Response(status=404, text="Not Found")
        if request.path != "/v1/completions" or mode in ("ok", "no-tokenize"):
            return await handler(request)
        if mode == "garbage":
            return web.Response(status=200, text="<html>upstream error</html>")
        if mode == "slow":
            await asyncio.sleep(state["seconds"])
            return await handler(request)
        if mode == "fail" and state["count"] > 0:
            state["count"] -= 1
            return web.Response(status=503, text="overloaded")
        if mode == "blind":
            body = await request.json()
            body["temperature"] = 1.0
            return web.json_response(await asyncio.to_thread(scorer.completion, body))
        resp = await handler(request)
        if mode == "short":
            body = json.loads(resp.body)
            body["choices"][0]["prompt_logprobs"].pop()
            return web.json_response(body)
        return resp

    app.middlewares.append(misbehave)
    app.add_routes([web.post("/fault", fault)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
