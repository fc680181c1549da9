"""
The README's training-curve figures (the small-scale analogues of the paper's Figs. 2 and 5) from
04_stable_reinforce.py's metrics.jsonl files, and a compact copy of those files to commit beside them.

    python assets/plot_curves.py assets/rl_stress.png "StableReinforce=runs/rl_s_sr/metrics.jsonl" \
        "no filter=runs/rl_s_nofilt/metrics.jsonl" "no pre-clip=..." "Reinforce++=..." --compact assets/metrics

Panels: mean reward; the largest |policy loss| of any micro-batch and of any single token (log scale); mean
response length; the share of tokens zeroed by the 3-sigma filter, and the share whose log-ratio lies outside the
Pre-CLIP bounds [ln 1e-3, ln 1e3] (clamped only in runs with Pre-CLIP on; counted in all).
Reward and length are shown as 5-step moving averages over the raw steps (faint).
"""
import argparse, json
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("out", help="the PNG to write")
p.add_argument("runs", nargs="+", metavar="NAME=METRICS.jsonl")
p.add_argument("--title", default="")
p.add_argument("--compact", default=None, help="also write each run's rows without the item ids to this folder")
args = p.parse_args()


def smooth(xs, w=5):
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
for spec in args.runs:
    name, path = spec.split("=", 1)
    rows = [json.loads(line) for line in open(path)]
    if args.compact:
        Path(args.compact).mkdir(parents=True, exist_ok=True)
        keep = ("step", "reward", "accuracy", "format_rate", "answered_1", "consistency_rate", "filtered_frac",
                "preclip_frac", "clip_frac", "policy_loss", "max_policy_loss", "max_token_loss", "kl", "lr", "grad_norm",
                "skipped_steps", "response_len", "seconds", "rollout_tok_s", "train_tok_s", "logp_delta_mean",
                "logp_delta_max")
        with open(Path(args.compact) / f"{Path(path).parent.name}.jsonl", "w") as f:
            f.writelines(json.dumps({k: (round(r[k], 6) if isinstance(r[k], float) else r[k]) for k in keep if k in r})
                         + "\n" for r in rows)
    steps = [r["step"] for r in rows]
    line, = axes[0].plot(steps, smooth([r["reward"] for r in rows]), label=name)
    c = line.get_color()
    axes[0].plot(steps, [r["reward"] for r in rows], color=c, alpha=0.2)
    axes[1].semilogy(steps, [max(r["max_policy_loss"], 1e-6) for r in rows], color=c, label=name)
    axes[1].semilogy(steps, [max(r["max_token_loss"], 1e-6) for r in rows], color=c, ls=":", alpha=0.7)
    axes[2].plot(steps, smooth([r["response_len"] for r in rows]), color=c, label=name)
    axes[3].plot(steps, [r["filtered_frac"] for r in rows], color=c, label=f"{name}: filtered")
    axes[3].plot(steps, [r["preclip_frac"] for r in rows], color=c, ls="--", label=f"{name}: out of bounds")
for ax, title in zip(axes, ("reward (mean; 5-step average)", "max |loss|: micro-batch (-), token (:), log",
                            "response length, tokens (5-step average)", "tokens filtered (-) / outside Pre-CLIP bounds (--)")):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
axes[3].legend(fontsize=6)
fig.suptitle(args.title, fontsize=11)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
