"""How held-out games of textarena's GuessTheNumber end for a compare grid's final students (step 30): a win,
out of turns, or quit by two invalid moves.

Usage: python textarena_endings.py GRID_DIR OUT.json (GRID_DIR/endings.json in textarena/ and
investigation/textarena-quit-for-credit/ were written by it, with the adapter of each grid's commit).
"""
import collections, json, sys
import torch
from unittest import mock
import atod_fast.trainer.evaluation as ev
from atod_fast.trainer.models import load_causal_lm

grid = sys.argv[1]
out = {}
for m in ("opd", "atod", "atod-no-turn"):
    for s in (0, 1, 2):
        run = f"{grid}/runs/{m}/seed{s}"
        lm, tok = load_causal_lm(f"{run}/checkpoints/step-000030/student", dtype="float32")
        got = []
        real = ev.rollout_stats
        with mock.patch.object(ev, "rollout_stats", lambda t: (got.extend(t), real(t))[1]):
            ev.evaluate_model(lm, tok, env_name="textarena", env_kwargs={"env_id": "GuessTheNumber-v0", "max_turns": 5},
                              episodes=128, max_turns=None, max_new_tokens=8, max_episode_tokens=1024,
                              temperature=1.0, device=torch.device("cpu"))
        c = collections.Counter()
        rew = collections.defaultdict(float)
        for t in got:
            kind = "win" if t.success else ("quit (2 invalid moves)" if t.invalid_actions >= 2 else
                                             ("out of turns" if t.num_turns >= 5 else "other"))
            c[kind] += 1
            rew[kind] += t.reward
        out[f"{m}/seed{s}"] = {k: {"episodes": c[k], "reward_mean": rew[k] / c[k]} for k in c}
        print(m, s, {k: (c[k], round(rew[k] / c[k], 3)) for k in sorted(c)}, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
