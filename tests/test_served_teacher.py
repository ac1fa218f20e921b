"""The served teacher: `atod-fast serve-teacher` as a separate process, the ServedTeacher client against it,
and every failure against a real server (down, killed mid-run, garbage, wrong shape, too slow, flaky)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("aiohttp")

from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.served_teacher import (
    ServedTeacher,
    TeacherResponseError,
    TeacherUnavailable,
    parse_prompt_logprobs,
)

TINY_SFT = ["sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32",
            "sft.arch.intermediate_size=64", "sft.arch.num_heads=2"]
HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def start(args: list[str], port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def teacher_path(private_cache):
    from atod_fast.trainer.loop import teacher_location

    yield teacher_location(load_train_config(None, TINY_SFT), progress=False)


@pytest.fixture(scope="module")
def server(teacher_path):
    """`atod-fast serve-teacher --model builtin` (the same cached teacher as teacher_path)."""
    port = free_port()
    proc, url = start(["-m", "atod_fast", "serve-teacher", "--model", "builtin", "--port", str(port), *TINY_SFT],
                      port)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def faulty(teacher_path):
    port = free_port()
    proc, url = start([str(HERE / "teacher_fault_server.py"), teacher_path, str(port)], port)
    yield url
    stop(proc)


@pytest.fixture
def fault(faulty):
    def set_mode(mode: str, **kw):
        assert post(faulty + "/fault", {"mode": mode, "count": 0, "seconds": 0.0, **kw})[0] == 200

    yield set_mode
    set_mode("ok")


@pytest.fixture(scope="module")
def local(teacher_path):
    from atod_fast.trainer.models import load_causal_lm

    lm, tok = load_causal_lm(teacher_path)
    return lm.eval(), tok


def client(url: str, tok, **kw) -> ServedTeacher:
    opts = dict(topk=5, temperature=1.0, timeout_s=10.0, retries=2, max_inflight=4, vocab_size=len(tok),
                backoff_s=0.05)
    opts.update(kw)
    return ServedTeacher(url, **opts)


def sequences(tok, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, len(tok), (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def local_logprobs(lm, ids: list[int], temperature: float) -> torch.Tensor:
    """The local teacher's log-probs of every next token, from its last hidden states and LM head (as the trainer's
    dense teacher computes them). [L - 1, V]"""
    from atod_fast.trainer.models import decoder_of, lm_head

    with torch.no_grad():
        h = decoder_of(lm)(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
        w, b = lm_head(lm)
        z = h.float() @ w.float().T + (0 if b is None else b.float())
    return torch.log_softmax(z[:-1] / temperature, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_served_topk_equals_the_local_teacher(server, local, temperature):
    lm, tok = local
    seqs = sequences(tok, 6)
    positions = [list(range(0, len(s) - 1, 2)) for s in seqs]  # some positions, as agent tokens would be
    out = client(server, tok, topk=5, temperature=temperature).score_sequences(seqs, positions)
    ids, lps, own = out["teacher_topk_ids"], out["teacher_topk_logprobs"], out["teacher_logprobs"]
    assert ids.shape == lps.shape == (sum(map(len, positions)), 6) and own.shape == (ids.shape[0],)
    r = 0
    for s, pos in zip(seqs, positions, strict=True):
        ref = local_logprobs(lm, s, temperature)
        for p in pos:
            top_lp, top_id = ref[p].topk(5)
            assert ids[r, :5].tolist() == top_id.tolist()
            assert torch.allclose(lps[r, :5], top_lp, rtol=0, atol=1e-4)
            assert abs(float(own[r]) - float(ref[p, s[p + 1]])) <= 1e-4
            if s[p + 1] in top_id.tolist():  # padding: the sampled id with no mass
                assert ids[r, 5] == s[p + 1] and lps[r, 5] == -float("inf")
            else:
                assert ids[r, 5] == s[p + 1] and abs(float(lps[r, 5]) - float(ref[p, s[p + 1]])) <= 1e-4
            r += 1


def test_response_has_vllm_shape(server, local):
    _, tok = local
    ids = sequences(tok, 1, seed=3)[0]
    status, body = post(server + "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 3,
                                                     "temperature": 1.0})
    assert status == 200 and body["object"] == "text_completion"
    plp = body["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        e = plp[p]
        assert str(ids[p]) in e and len(e) in (3, 4)
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in e.values())
        ranks = sorted(v["rank"] for v in e.values())
        assert ranks[:3] == [1, 2, 3]
        assert e[str(ids[p])]["decoded_token"] == tok.decode([ids[p]])
    assert body["usage"]["prompt_tokens"] == len(ids)
    with urllib.request.urlopen(server + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "builtin"


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "text", "prompt_logprobs": 1}, "prompt: expected a non-empty list of token ids"),
    ({"prompt": [1, 2], "prompt_logprobs": 21}, "prompt_logprobs: expected an integer in [0, 20]"),
    ({"prompt": [1, 2], "prompt_logprobs": 1, "max_tokens": 5}, "max_tokens"),
    ({"prompt": [1, 10**6], "prompt_logprobs": 1}, "outside the model's vocabulary"),
    ({"prompt": [1, 2], "prompt_logprobs": 1, "model": "other"}, "model: this server serves 'builtin'"),
])
def test_bad_requests_are_400_naming_the_field(server, body, needle):
    status, out = post(server + "/v1/completions", body)
    assert status == 400 and out["object"] == "error" and needle in out["message"]


def test_connect_checks_the_server(server, local):
    _, tok = local
    c = client(server, tok, temperature=0.7)
    c.connect(tok, "You are guessing a number between 1 and 31.")
    assert c.model == "builtin"
    with pytest.raises(ConfigError, match=r"refuses prompt_logprobs=50 \(model.teacher_topk\)"):
        client(server, tok, topk=50).connect(tok, "You are guessing a number between 1 and 31.")


def test_server_down_at_start_is_a_config_error_naming_the_url(local):
    _, tok = local
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"model.teacher_server: {url} does not answer"):
        client(url, tok).connect(tok, "probe text")


def test_a_different_tokenizer_is_caught_at_start(server):
    from atod_fast.trainer.models import build_tokenizer

    other = build_tokenizer(["completely different text for another tokenizer"] * 20, 300)
    with pytest.raises(ConfigError, match="tokenizer differs from the student's"):
        client(server, other).connect(other, "You are guessing a number between 1 and 31.")


def test_without_tokenize_the_probe_is_compared_on_decoded_tokens(faulty, fault, local):
    from atod_fast.trainer.models import build_tokenizer

    _, tok = local
    fault("no-tokenize")
    client(faulty, tok).connect(tok, "You are guessing a number between 1 and 31.")
    other = build_tokenizer(["completely different text for another tokenizer"] * 20, 300)
    with pytest.raises(ConfigError, match="tokenizer differs from the student's"):
        client(faulty, other).connect(other, "You are guessing a number between 1 and 31.")


def test_server_ignoring_temperature_is_caught_at_start(faulty, fault, local):
    _, tok = local
    fault("blind")
    with pytest.raises(ConfigError, match="ignores the temperature"):
        client(faulty, tok, temperature=0.5).connect(tok, "You are guessing a number between 1 and 31.")


def test_garbage_and_wrong_shape_name_what_was_wrong(faulty, fault, local):
    _, tok = local
    seqs = sequences(tok, 3)
    pos = [[0, 1] for _ in seqs]
    fault("garbage")
    with pytest.raises(TeacherResponseError, match="the response is not JSON: '<html>upstream error"):
        client(faulty, tok).score_sequences(seqs, pos)
    fault("short")
    with pytest.raises(TeacherResponseError, match=r"prompt_logprobs: \d+ entries for a prompt of \d+ tokens"):
        client(faulty, tok).score_sequences(seqs, pos)


def test_timeouts_and_5xx_are_retried_then_give_up(faulty, fault, local):
    _, tok = local
    seqs, pos = sequences(tok, 2), [[0], [1]]
    fault("fail", count=2)  # two 503s, then answers: within 2 retries of the first request
    out = client(faulty, tok, retries=2, max_inflight=1).score_sequences(seqs, pos)
    assert out["teacher_topk_ids"].shape == (2, 6)
    fault("fail", count=100)
    with pytest.raises(TeacherUnavailable, match=r"HTTP 503.*after 2 retries"):
        client(faulty, tok, retries=2).score_sequences(seqs, pos)
    fault("slow", seconds=3.0)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"TimeoutError.*after 1 retries"):
        client(faulty, tok, retries=1, timeout_s=0.5).score_sequences(seqs, pos)
    assert time.monotonic() - t0 < 2.5


def test_server_killed_mid_run(teacher_path, local):
    _, tok = local
    port = free_port()
    proc, url = start(["-m", "atod_fast", "serve-teacher", "--model", teacher_path, "--port", str(port)], port)
    c = client(url, tok, retries=1)
    try:
        seqs = sequences(tok, 2)
        assert c.score_sequences(seqs, [[0], [0]])["teacher_topk_ids"].shape == (2, 6)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(TeacherUnavailable, match=f"teacher server {url}/v1/completions: ClientConnectorError"):
        c.score_sequences(seqs, [[0], [0]])


def test_parse_names_the_bad_entry():
    body = {"choices": [{"prompt_logprobs": [None, {"7": {"logprob": -0.1}}, {"3": {"logprob": "x"}}]}]}
    with pytest.raises(TeacherResponseError, match=r"prompt_logprobs\[2\]\['3'\].logprob"):
        parse_prompt_logprobs(body, [1, 7, 3], [0, 1], 1, 10)
    with pytest.raises(TeacherResponseError, match=r"prompt_logprobs\[1\]: the prompt's own token 5 is missing"):
        parse_prompt_logprobs(body, [1, 5, 3], [0], 1, 10)
    with pytest.raises(TeacherResponseError, match=r"1 entries, expected the top 4"):
        parse_prompt_logprobs(body, [1, 7, 3], [0], 4, 10)


# ----------------------------------------------------------------------------- training against a served teacher
TRAIN = [*TINY_SFT, "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
         "model.student_arch.num_heads=2", "rollout.episodes_per_step=4", "eval.at_end=false",
         "logging.progress=false", "logging.tensorboard=false", "loss.divergence=forward_kl", "model.teacher_topk=5",
         "model.teacher_retries=1", "model.teacher_timeout_s=20"]


def test_train_two_steps_against_a_serve_teacher_process(server, tmp_path):
    from atod_fast.cli import main
    from atod_fast.trainer.metrics import read_metrics

    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", *TRAIN,
                 f"model.teacher_server={server}"]) == 0
    m = read_metrics(run)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert not x["teacher_skipped"] and math.isfinite(x["loss"]) and x["distill"] > 0


def test_sampled_token_scores_at_k0_equal_the_local_teacher(server, local):
    lm, tok = local
    seqs = sequences(tok, 4, seed=1)
    positions = [list(range(1, len(s) - 1, 3)) for s in seqs]
    out = client(server, tok, topk=0, sampled=True).score_sequences(seqs, positions)
    own = out["teacher_logprobs"]
    ref = torch.cat([local_logprobs(lm, s, 1.0)[pos, torch.tensor(s)[torch.tensor(pos) + 1]]
                     for s, pos in zip(seqs, positions, strict=True)])
    assert own.shape == ref.shape and torch.allclose(own, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("where", ["served", "local"])
def test_train_two_steps_on_sampled_tokens_alone(server, tmp_path, where):
    from atod_fast.cli import main
    from atod_fast.trainer.metrics import read_metrics

    run = tmp_path / "run"
    args = [*TRAIN, "loss.divergence=sampled_reverse_kl", "model.teacher_topk=0"]
    if where == "served":
        args.append(f"model.teacher_server={server}")
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", *args]) == 0
    m = read_metrics(run)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:  # the one-sample estimate can be negative on a token, not on average over a step
        assert not x["teacher_skipped"] and math.isfinite(x["loss"]) and x["distill"] > 0
        assert x["teacher_entropy"] > 0


def test_teacher_topk_zero_needs_sampled_tokens():
    with pytest.raises(ConfigError, match=r"model\.teacher_topk"):
        load_train_config(None, ["model.teacher_server=http://127.0.0.1:1", "loss.divergence=forward_kl",
                                 "model.teacher_topk=0"])
    with pytest.raises(ConfigError, match=r"loss\.divergence"):
        load_train_config(None, ["model.teacher_server=http://127.0.0.1:1", "loss.divergence=jsd"])
    cfg = load_train_config(None, ["model.teacher_server=http://127.0.0.1:1", "loss.divergence=sampled_reverse_kl",
                                   "model.teacher_topk=0"])
    assert cfg.model.teacher_topk == 0


def test_server_down_at_start_stops_train_with_the_url(tmp_path, capsys):
    from atod_fast.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["train", "--output-dir", str(tmp_path / "r"), "--max-steps", "1", *TRAIN,
                 f"model.teacher_server={url}"]) == 2
    assert f"atod-fast: error: model.teacher_server: {url} does not answer" in capsys.readouterr().err


def _trainer(url: str, run: Path):
    from atod_fast.trainer.loop import Trainer

    tr = Trainer(load_train_config(None, [*TRAIN, f"model.teacher_server={url}", f"output_dir={run}"]))
    tr.setup(progress=False)
    return tr


def test_a_step_whose_teacher_fails_is_skipped_and_the_run_goes_on(faulty, fault, tmp_path, caplog):
    tr = _trainer(faulty, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.models.policy.state_dict().items()}
    fault("fail", count=4 * 2)  # every request of step 1 fails twice (model.teacher_retries=1)
    with caplog.at_level("WARNING", logger="atod_fast"):
        m1 = tr.step(1)
    assert m1["teacher_skipped"] and "step 1: the teacher server failed" in caplog.text and "skipped" in caplog.text
    assert all(torch.equal(v, tr.models.policy.state_dict()[k]) for k, v in before.items())  # no update
    m2 = tr.step(2)
    assert not m2["teacher_skipped"] and math.isfinite(m2["loss"])
    assert any(not torch.equal(v, tr.models.policy.state_dict()[k]) for k, v in before.items())


def test_serve_teacher_killed_mid_run(teacher_path, tmp_path, caplog):
    port = free_port()
    proc, url = start(["-m", "atod_fast", "serve-teacher", "--model", teacher_path, "--port", str(port)], port)
    try:
        tr = _trainer(url, tmp_path / "run")
        assert not tr.step(1)["teacher_skipped"]
    finally:
        proc.kill()
        proc.wait()
    with caplog.at_level("WARNING", logger="atod_fast"):
        m = tr.step(2)
    assert m["teacher_skipped"] and f"{url}/v1/completions" in caplog.text


def test_missing_extras_are_config_errors_naming_them(monkeypatch):
    from atod_fast.trainer.config import LoraSettings, TinyArch
    from atod_fast.trainer.lora import apply_lora
    from atod_fast.trainer.models import build_tokenizer, tiny_llama

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp raises ImportError
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"model\.teacher_server: .*pip install 'atod-fast\[serve\]'"):
        ServedTeacher("http://127.0.0.1:1", topk=5, temperature=1.0, timeout_s=1, retries=0, max_inflight=1,
                      vocab_size=10)
    tok = build_tokenizer(["a few words"] * 5, 300)
    with pytest.raises(ConfigError, match=r"model\.lora\.r: .*pip install 'atod-fast\[lora\]'"):
        apply_lora(tiny_llama(TinyArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, 0),
                   LoraSettings(r=2), seed=0)


def test_resume_may_move_the_teacher_server_but_not_drop_it():
    from atod_fast.trainer.config import incompatible_keys

    served = ["loss.divergence=forward_kl", "model.teacher_server=http://a:8000"]
    a = load_train_config(None, served)
    moved = load_train_config(None, [*served, "model.teacher_server=http://b:9000", "model.teacher_retries=5"])
    assert incompatible_keys(a, moved) == []
    assert incompatible_keys(a, load_train_config(None, ["loss.divergence=forward_kl"])) == ["model.teacher_server"]
    assert "model.teacher_topk" in incompatible_keys(a, load_train_config(None, [*served, "model.teacher_topk=7"]))
    with pytest.raises(ConfigError,
                       match=r"loss\.divergence: expected forward_kl or sampled_reverse_kl with model\.teacher_server"):
        load_train_config(None, ["model.teacher_server=http://a:8000"])
