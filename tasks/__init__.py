"""The task suite every stage is judged on: the helpfulness families with their gold judge
(suite.py, `python -m tasks.suite`), the red-team, borderline, benign and everyday
families (redteam.py), the request kind round 1 never saw (novel.py), preference pairs for
the reward model and DPO (prefs.py), and fresh prompts for RL (rl_prompts.py). Imports
data.text and data.files, never the curation modules, the model or the trainer."""
