"""The trainer end to end on tiny models (CPU): train, resume, eval, failures, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atod_fast.cli import main
from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.metrics import REQUIRED_KEYS, read_metrics

TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "eval.episodes=8", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1",
]


@pytest.fixture(scope="module", autouse=True)
def teacher_path(private_cache):
    """One tiny built-in teacher in a private cache, shared by every test (and their subprocesses)."""
    from atod_fast.trainer.loading import teacher_location

    path = teacher_location(load_train_config(None, TINY), progress=False)
    yield path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atod_fast", *args], capture_output=True, text=True, timeout=300)


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / f"step-{step:06d}"
    out = {f"lm.{k}": v for k, v in load_file(str(ckpt / "student" / "model.safetensors")).items()}
    out.update({f"v.{k}": v for k, v in load_file(str(ckpt / "value_head.safetensors")).items()})
    return out


def test_two_step_default_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", *TINY, "logging.tensorboard=true"]) == 0
    table = capsys.readouterr().out
    for name in ("teacher", "student-before", "student-after"):
        assert f"| {name} |" in table
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r), set(REQUIRED_KEYS) - set(r)
        for k in ("loss", "distill", "entropy", "lambda_mean", "tokens_per_s"):
            assert torch.isfinite(torch.tensor(r[k])), k
        assert 0.1 <= r["lambda_mean"] <= 0.9
    assert load_train_config(str(run / "config.yaml")).max_steps == 2
    assert (run / "checkpoints" / "step-000002" / "student" / "model.safetensors").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"teacher", "student-before", "student-after"}
    assert ev["student-before"]["episodes"] == 8

    # The student moved, the teacher did not.
    before = load_train_config(str(run / "config.yaml"))
    assert before.model.teacher == "builtin"

    # eval --json on that run: one object with the documented keys.
    out = _cli("eval", "--checkpoint", str(run), "--episodes", "4", "--json")
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert {"success_rate", "reward_mean", "episodes"} <= set(obj)
    assert obj["episodes"] == 4 and 0 <= obj["success_rate"] <= 1 and obj["step"] == 2
    assert set(obj["compare"]) == {"teacher", "student-before"}

    # Plots from the same run.
    from atod_fast.cli.plot import plot_run

    paths = plot_run(run)
    assert {p.name for p in paths} == {"success.png", "reward.png", "lambda_by_turn.png", "losses.png"}
    assert all(p.stat().st_size > 1000 for p in paths)

    # Resuming a finished run says so and does nothing.
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", "--resume", "auto", *TINY]) == 0
    assert "already finished" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_sigkill_and_resume_gives_the_same_weights(tmp_path):
    steps = 8
    args = ["train", "--max-steps", str(steps), *TINY, "eval.at_end=false"]
    ref = _cli(*args, "--output-dir", str(tmp_path / "a"))
    assert ref.returncode == 0, ref.stderr

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "atod_fast", *args, "--output-dir", str(b)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (b / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.name for p in (b / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert f"step-{steps:06d}" not in done, "killed too late to test anything"

    # Debris of a save interrupted at another moment is ignored, then cleaned up.
    debris = b / "checkpoints" / ".tmp-step-000003-12345"
    (debris / "student").mkdir(parents=True)
    (debris / "student" / "model.safetensors").write_bytes(b"partial")
    res = _cli(*args, "--output-dir", str(b), "--resume", "auto")
    assert res.returncode == 0, res.stderr
    wa, wb = _weights(tmp_path / "a", steps), _weights(b, steps)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The log of the resumed run is the log of the uninterrupted one.
    la, lb = read_metrics(tmp_path / "a"), read_metrics(b)
    assert [r["step"] for r in lb] == list(range(1, steps + 1))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # keep_last=2, and no debris left
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == [f"step-{steps - 1:06d}", f"step-{steps:06d}"]

    # Resuming with a config that changes the training is refused with a clear message.
    bad = _cli(*args, "--output-dir", str(b), "--resume", "auto", "ppo.epochs=3")
    assert bad.returncode == 2
    assert "ppo.epochs" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_env_exceptions_fail_the_episode_not_the_run(tmp_path, teacher_path, caplog):
    from atod_fast.envs import GuessNumberEnv, register, registered

    class Flaky(GuessNumberEnv):
        def step(self, action):
            if self._secret % 2 == 0:
                raise RuntimeError("flaky environment")
            return super().step(action)

    if "test_flaky_guess" not in registered():
        register("test_flaky_guess", Flaky, "guess_number that raises on even secrets")
    run = tmp_path / "run"
    rc = main(["train", "--output-dir", str(run), "--max-steps", "2", *TINY, "env.name=test_flaky_guess",
               f"model.teacher={teacher_path}", "eval.at_end=false"])
    assert rc == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and sum(r["env_errors"] for r in rows) > 0
    assert "RuntimeError: flaky environment" in caplog.text


def test_nonfinite_loss_skips_then_stops(tmp_path, monkeypatch, capsys):
    import atod_fast.trainer.learner as tr

    real = tr.atod_loss

    def nan_loss(*a, **k):
        out = real(*a, **k)
        return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})

    monkeypatch.setattr(tr, "atod_loss", nan_loss)
    run = tmp_path / "run"
    rc = main(["train", "--output-dir", str(run), "--max-steps", "6", *TINY, "optim.max_nonfinite_steps=2",
               "eval.at_end=false"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss in 2 consecutive steps" in err and "last good checkpoint" in err
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped_updates"] > 0 for r in rows)


@pytest.mark.parametrize("override, needle", [
    ("ppo.epochs=0", "ppo.epochs: expected an integer >= 1, got 0"),
    ("ppo.epocs=2", "ppo.epocs"),
    ("rollout.temperature=hot", "rollout.temperature"),
    ("schedule.mode=sft", "schedule.mode: expected one of atod, opd, rl"),
    ("env.name=chess", "env.name"),
    ("schedule.lambda_min=0.95", "schedule.lambda_min"),
    ("model.student_arch.num_heads=3", "model.student_arch.num_heads"),
    ("model.teacher=null", "model.teacher"),
    ("noequals", "key.sub=value"),
])
def test_config_errors_name_the_key(override, needle, capsys):
    with pytest.raises(ConfigError, match=None) as e:
        load_train_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_print_config_and_yaml_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("ppo:\n  epochs: 3\nschedule:\n  mode: opd\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--print-config", "loss.kl_coef=0.1"]) == 0
    out = capsys.readouterr().out
    cfg = load_train_config(None, [])
    assert "epochs: 3" in out and "mode: opd" in out and "kl_coef: 0.1" in out and cfg.ppo.epochs == 2


def test_existing_run_needs_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "1", *TINY, "eval.at_end=false"]) == 0
    assert main(["train", "--output-dir", str(run), "--max-steps", "1", *TINY]) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_different_tokenizers_are_refused(teacher_path):
    from atod_fast.trainer.models import build_tokenizer, check_same_tokenizer, load_causal_lm

    _, tok = load_causal_lm(teacher_path)
    other = build_tokenizer(["completely different text corpus"] * 10, 300)
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(tok, other, "student", "other", "teacher")
    check_same_tokenizer(tok, tok, "student", "same", "teacher")


def test_prepare_places_rewards_and_lambda_per_turn(teacher_path):
    """With γ = λ_GAE = 1 and no whitening, the return of every agent token is its episode's reward-to-go."""
    from atod_fast.trainer.loop import Trainer

    cfg = load_train_config(None, [*TINY, "ppo.gamma=1.0", "ppo.gae_lambda=1.0", "ppo.whiten_advantages=false",
                                   "rollout.episodes_per_step=8", "rollout.max_turns=3",
                                   "schedule.handover=fixed"])
    tr = Trainer(cfg)
    tr.setup(progress=False)
    trajs = tr.rollout(1)
    batch, data = tr.prepare(1, trajs)
    off = 0
    for t, n in zip(trajs, batch.counts, strict=True):
        pos = [i for i, a in enumerate(t.action_mask) if a]
        assert n == len(pos)
        assert data["targets"][off:off + n].tolist() == [t.tokens[i] for i in pos]
        turns = torch.tensor([t.turn_idx[i] for i in pos])
        assert torch.equal(data["lam"][off:off + n], tr.controller.schedule(0, turns))
        if not t.truncated:
            to_go = torch.tensor([sum(t.turn_rewards[k:]) for k in turns.tolist()])
            torch.testing.assert_close(data["returns"][off:off + n].cpu(), to_go)
        off += n
    assert off == data["targets"].numel() == data["teacher_hidden"].shape[0]
    assert any(t.end_reason == "turn_limit" for t in trajs)


def test_packed_and_padded_forwards_agree(tmp_path):
    """The training forward gives the same step whether sequences are packed or padded."""
    res = {}
    for mode in ("packed", "padded"):
        run = tmp_path / mode
        assert main(["train", "--output-dir", str(run), "--max-steps", "1", *TINY, "eval.at_end=false",
                     f"model.packing={mode}"]) == 0
        res[mode] = read_metrics(run)[0]
    for k in ("loss", "distill", "pg", "entropy", "value_loss"):
        assert res["packed"][k] == pytest.approx(res["padded"][k], rel=1e-4, abs=1e-6), k
