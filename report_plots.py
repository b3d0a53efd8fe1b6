"""The report's plots (matplotlib, imported only here): pretraining and SFT loss curves,
held-out accuracy per stage and family, and PPO's reward and KL by step and its gold
metrics and reward-model score against KL.
"""
from __future__ import annotations

import os

def make_plots(out: str, pre_rows, sft_rows, ppo_rows, accuracy, policy: str = "ppo") -> list[str]:
    """PNG plots next to the report (matplotlib, no display needed); PPO's curves only
    when there are PPO rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(*series(pre_rows, "loss"), label="train")
    axes[0].plot(*series(pre_rows, "val_loss"), "o-", label="val")
    axes[0].set(title="pretraining loss", xlabel="step")
    axes[1].plot(*series(sft_rows, "loss"), label="train")
    axes[1].plot(*series(sft_rows, "heldout_loss"), "o-", label="held-out")
    axes[1].set(title="SFT loss (assistant tokens)", xlabel="step")
    for ax in axes:
        ax.legend()
    files.append("loss_curves.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    if ppo_rows:
        files += ppo_plots(out, ppo_rows, series, plt)

    families = sorted(accuracy["sft"]["per_family"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.27
    for i, stage in enumerate(("pretrain", "sft", policy)):
        ax.bar([j + (i - 1) * width for j in range(len(families))],
               [100 * accuracy[stage]["per_family"].get(f, 0.0) for f in families], width, label=stage)
    ax.set_xticks(range(len(families)), families)
    ax.set(title="held-out gold accuracy by stage (%)", ylim=(0, 100))
    ax.legend()
    files.append("accuracy_by_stage.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)
    return files


def ppo_plots(out: str, ppo_rows, series, plt) -> list[str]:
    """PPO's reward and KL per step, and its evaluations' gold metrics against KL."""
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(*series(ppo_rows, "objective/scores"), label="score")
    axes[0].plot(*series(ppo_rows, "objective/rlhf_reward"), label="score - beta * KL")
    axes[0].set(title="PPO reward per response", xlabel="step")
    axes[0].legend()
    axes[1].plot(*series(ppo_rows, "objective/kl"))
    axes[1].set(title="PPO KL to the SFT model", xlabel="step")
    files.append("ppo_curves.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    # Gao et al.'s picture: what the reward model sees against what the gold judge sees, as
    # the policy moves away from the SFT model
    evals = [r for r in ppo_rows if "eval/kl" in r]
    if evals:
        fig, gold = plt.subplots(figsize=(10, 3.6))
        kl = [r["eval/kl"] for r in evals]
        for key, label in (("eval/accuracy", "task accuracy"), ("eval/safety/harmful_refusal", "harmful refused"),
                           ("eval/safety/borderline_over_refusal", "borderline over-refused"),
                           ("eval/safety/benign_template_over_refusal", "benign acts over-refused"),
                           ("eval/safety/open_request_over_refusal", "everyday over-refused")):
            if all(key in r for r in evals):
                gold.plot(kl, [100 * r[key] for r in evals], "o-", label=f"{label} (gold, %)")
        gold.set(xlabel="KL to the SFT model (nats per response)", ylabel="gold judge (%)", ylim=(-2, 102),
                 title="PPO evaluations: gold metrics and the reward model's score against KL")
        rm_axis = gold.twinx()
        rm_axis.plot(kl, [r["eval/rm_score"] for r in evals], "k--", marker="s", label="reward-model score")
        rm_axis.set(ylabel="mean reward-model score")
        lines = gold.get_legend_handles_labels()
        more = rm_axis.get_legend_handles_labels()
        gold.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
        files.append("ppo_gold_vs_kl.png")
        fig.tight_layout()
        fig.savefig(os.path.join(out, files[-1]), dpi=100)
        plt.close(fig)
    return files
