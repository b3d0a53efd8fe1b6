"""The task suite every stage is judged on: the files (suite.py, `python -m tasks.suite`),
the eight helpfulness families (families.py) and their gold judge (judge.py), the harmful
and borderline families (redteam.py), benign and everyday requests (everyday.py), the
refusal judge (refusal.py), the request kind round 1 never saw (novel.py), preference
pairs for the reward model and DPO (prefs.py), fresh prompts for RL (rl_prompts.py), and
the simulated rater (rater.py). Imports data.text, data.files and cli, never the curation
modules, the model or the trainer."""
