"""Environments from outside atod-fast: module:Class names, entry points, their errors, and env.step_timeout_s."""

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atod_fast.envs import EnvSpecError, TimedEnv, available, make, resolve
from atod_fast.trainer.config import ConfigError, load_train_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_env"

TINY = [
    "sft.steps=10", "sft.episodes=32", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=4", "eval.episodes=4", "logging.progress=false",
    "logging.tensorboard=false", "ppo.epochs=1", "ppo.minibatches=1",
]

MODULE = '''
import random, threading

class CountDown:
    """Say the numbers from N down to 1, one per turn."""

    def __init__(self, *, start=3, max_turns=4, expert_error_rate=0.0, hang_on_seed_mod=0):
        self.start, self.max_turns, self.rate, self.hang = start, max_turns, expert_error_rate, hang_on_seed_mod

    def reset(self, seed):
        self.next, self.turn, self.seed = self.start, 0, seed
        self.rng = random.Random(seed)
        return f"Count down from {self.start} to 1, one number per turn."

    def step(self, action):
        if self.hang and self.seed < 2**40 and self.seed % self.hang == 0:  # training seeds only
            threading.Event().wait()  # never returns
        self.turn += 1
        ok = action.strip() == str(self.next)
        if ok:
            self.next -= 1
        if self.next == 0:
            return "Done.", 1.0, True, {"success": True, "invalid": False}
        if self.turn >= self.max_turns:
            return "Out of turns.", 0.0, True, {"success": False, "invalid": not ok}
        return ("Next." if ok else "Wrong."), 0.0, False, {"invalid": not ok}

    def expert_action(self):
        return str(self.start) if self.rng.random() < self.rate else str(self.next)

def no_step():
    return type("Half", (), {"max_turns": 3, "reset": lambda self, seed: "hi"})()

NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "countdown_env.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_class_name_makes_the_environment(plugin_dir):
    env = make("countdown_env:CountDown", start=2)
    assert env.reset(0).startswith("Count down from 2")
    assert env.step("2")[:3] == ("Next.", 0.0, False)
    assert env.step("1")[1:3] == (1.0, True)
    cfg = load_train_config(None, ["env.name=countdown_env:CountDown", "env.kwargs.start=2"])
    assert cfg.env.make().start == 2


@pytest.mark.parametrize("name, message", [
    ("no_such_module_xyz:Env", r"env.name='no_such_module_xyz:Env': module 'no_such_module_xyz' cannot be imported"),
    ("countdown_env:Missing", r"env.name='countdown_env:Missing': module 'countdown_env' has no attribute 'Missing'"),
    ("countdown_env:NOT_CALLABLE", r"env.name='countdown_env:NOT_CALLABLE': 'NOT_CALLABLE' is not a class or factory"),
    ("no_such_env", r"env.name: unknown environment 'no_such_env'; expected one of \[.*guess_number.*\], an entry "
                    r"point of group atod_fast.envs, or package.module:ClassOrFactory"),
])
def test_unusable_names_are_one_line_config_errors(plugin_dir, name, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_train_config(None, [f"env.name={name}"])
    assert "\n" not in str(err.value)


def test_a_name_with_an_empty_side_is_named():
    for name in ("countdown_env:", ":CountDown"):
        with pytest.raises(EnvSpecError, match=rf"env.name='{name}': expected package.module:ClassOrFactory"):
            make(name)


def test_an_object_without_step_is_named(plugin_dir):
    cfg = load_train_config(None, ["env.name=countdown_env:no_step", "env.kwargs={}"])
    with pytest.raises(ConfigError, match=r"env.name='countdown_env:no_step': the object it makes \(Half\) has no "
                                          r"step \(an environment needs reset, step and max_turns\)"):
        cfg.env.make()


def test_cli_reports_a_bad_env_name_in_one_line(plugin_dir):
    env = {**os.environ, "PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "atod_fast", "train", "env.name=countdown_env:Missing"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "atod-fast: error: env.name='countdown_env:Missing': module 'countdown_env' has no attribute 'Missing'"]


def _fake_distribution(root: Path) -> None:
    """An installed distribution with an atod_fast.envs entry point, as pip would leave it (no pip needed)."""
    info = root / "lights_out_env-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lights-out-env\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[atod_fast.envs]\nlights_out = lights_out_env:LightsOutEnv\n")


def test_entry_point_environment_is_found_and_listed(tmp_path, monkeypatch):
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory, kind = resolve("lights_out")
    assert kind == "entry point" and factory.__name__ == "LightsOutEnv"
    env = make("lights_out", n=4, expert_error_rate=0.0)
    env.reset(1)
    while True:
        _, reward, done, info = env.step(env.expert_action())
        if done:
            break
    assert reward == 1.0 and info["success"]
    rows = {name: (kind, desc) for name, kind, desc in available()}
    assert rows["lights_out"] == ("entry point", "Switch off a row of lights by toggling one light (and its "
                                                 "neighbours) per turn.")
    assert rows["guess_number"][0] == "built-in" and rows["textworld_express"][0].startswith("adapter")
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EXAMPLE / "src")])}
    out = subprocess.run([sys.executable, "-m", "atod_fast", "envs"], env=env_vars, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("lights_out "))
    assert "entry point" in line and "Switch off a row of lights" in line
    assert "package.module:ClassOrFactory" in out


def test_a_hanging_step_ends_its_episode_and_the_env_recovers(plugin_dir, caplog):
    env = make("countdown_env:CountDown", step_timeout_s=0.3, hang_on_seed_mod=2)
    assert isinstance(env, TimedEnv) and env.max_turns == 4
    env.reset(1)
    assert env.expert_action() == "3"  # everything but reset/step is the wrapped environment's
    assert env.step("3")[0] == "Next."
    env.reset(2)  # even seed: step hangs
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="atod_fast"):
        obs, reward, done, info = env.step("3")
    assert time.perf_counter() - t0 < 5
    assert done and reward == 0.0 and info == {"success": False, "invalid": False, "timeout": True}
    assert "did not answer within 0.3s" in obs
    assert "step() on seed 2 took over env.step_timeout_s=0.3s; the episode ends as failed" in caplog.text
    with pytest.raises(RuntimeError, match="ended by a timeout"):
        env.step("2")
    env.reset(3)  # a fresh environment behind the wrapper
    assert env.step("3")[0] == "Next."


def test_step_timeout_is_validated():
    with pytest.raises(ConfigError, match=r"env.step_timeout_s: expected null or a number > 0, got 0"):
        load_train_config(None, ["env.step_timeout_s=0"])
    with pytest.raises(EnvSpecError):
        make("countdown_env_missing:X", step_timeout_s=1)


def test_training_goes_on_past_hanging_steps(plugin_dir, tmp_path, caplog, monkeypatch):
    from atod_fast.cli import main
    from atod_fast.trainer.metrics import read_metrics

    monkeypatch.setenv("ATOD_FAST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="atod_fast"):
        rc = main(["train", "--output-dir", str(run), "--max-steps", "2", *TINY, "env.name=countdown_env:CountDown",
                   "env.kwargs.hang_on_seed_mod=2", "env.step_timeout_s=0.2", "schedule.mode=rl",
                   "eval.at_end=false", "rollout.max_new_tokens=2"])
    assert rc == 0
    assert len(read_metrics(run)) == 2
    assert caplog.text.count("took over env.step_timeout_s=0.2s") >= 2


def test_module_env_trains_with_a_builtin_teacher_from_its_expert_and_evaluates(plugin_dir, tmp_path):
    """The acceptance check: a module outside the package, by env.name=mod:Class, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ATOD_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "atod_fast", "train", "--output-dir", str(run), "--max-steps", "2",
                          *TINY, "env.name=countdown_env:CountDown", "env.kwargs.start=2", "rollout.max_new_tokens=3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Held-out evaluation (4 episodes of countdown_env:CountDown" in res.stdout
    assert list((tmp_path / "cache" / "teachers").glob("countdown_env:CountDown-*/config.json"))
    res = subprocess.run([sys.executable, "-m", "atod_fast", "eval", "--checkpoint", str(run), "--no-compare",
                          "--episodes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "countdown_env:CountDown" in res.stdout
    grid = tmp_path / "grid"
    res = subprocess.run([sys.executable, "-m", "atod_fast", "compare", "--output-dir", str(grid), "--methods",
                          "teacher,opd", "--seeds", "0", "--max-steps", "1", "--eval-every", "1",
                          "--eval-episodes", "2",
                          *[o for o in TINY if not o.startswith("eval.")], "env.name=countdown_env:CountDown",
                          "env.kwargs.start=2", "rollout.max_new_tokens=3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (grid / "results.json").is_file() and "countdown_env:CountDown" in (grid / "results.md").read_text()
