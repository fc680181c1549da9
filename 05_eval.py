"""
Stage 5: evaluate reward-model checkpoints on held-out pairs, in BOTH response orders, with Voting@K.

    python 05_eval.py                                          # runs/02_sft/model and runs/04_rl/model
    python 05_eval.py --models runs/04_rl/model --vote-k 15

The official scripts always show the chosen response first, so a model that always answers "1" scores
100% there (PAPER.md B6). Here every item is judged twice, once in each order, and each order counts once.
Reported per model:
  acc_original / acc_swapped / acc  - greedy accuracy in each order and over both (the headline number)
  both_right                        - share of items judged right in both orders
  answered_1                        - share of parseable answers that are "1" (0.5 for an unbiased judge)
  parse_fail                        - share of outputs with no valid <answer>1|2</answer>; scored as wrong
  voting_at_k / any_at_k            - majority of K samples at temperature 1.0 (paper s5.1) / any sample right
Writes runs/05_eval/{eval.json, eval.md, generations_<name>.jsonl}.
"""
import argparse, json, time
from pathlib import Path
import torch
from tqdm import tqdm
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="runs/01_data/test_pairs.jsonl", help="pair file to evaluate on")
p.add_argument("--models", nargs="+", default=["runs/02_sft/model", "runs/04_rl/model"], help="checkpoints to compare")
p.add_argument("--out", default="runs/05_eval")
p.add_argument("--num-items", type=int, default=400, help="items to evaluate (each in both orders); 0 = all")
p.add_argument("--vote-k", type=int, default=5, help="samples per item for Voting@K (0 = skip)")
p.add_argument("--vote-items", type=int, default=100, help="items (each in both orders) for Voting@K")
p.add_argument("--max-new-tokens", type=int, default=96, help="paper: 1024 for RL, 4096 in the eval scripts")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
items = core.load_items(args.data)
if args.num_items:
    items = items[:args.num_items]
print(f"read {args.data}: evaluating {len(items)} items x 2 orders")


def judge_all(model, processor, jobs, temperature):
    """jobs: list of (item, swap). Returns the generated texts, in order, batched."""
    texts = []
    for i in tqdm(range(0, len(jobs), args.batch_size), desc=f"generate T={temperature}", leave=False):
        msgs = [core.pair_view(it, swap)[0] for it, swap in jobs[i:i + args.batch_size]]
        texts += core.sample(model, processor, msgs, args.max_new_tokens, temperature, args.device)[1]
    return texts


def evaluate(path):
    torch.manual_seed(args.seed)                                 # Voting@K samples are reproducible
    model, processor = core.load_policy(path, device=args.device)
    model.eval()
    t0 = time.time()
    jobs = [(it, swap) for swap in (False, True) for it in items]
    texts = judge_all(model, processor, jobs, temperature=0.0)    # greedy, as in the paper's main results
    rows = []
    for (it, swap), text in zip(jobs, texts):
        label = 3 - it["label"] if swap else it["label"]
        choice = core.parse_choice(text)
        rows.append(dict(id=it["id"], order="swapped" if swap else "original", label=label, choice=choice,
                         correct=int(choice == label), text=text))
    n = len(items)
    orig, swapped = rows[:n], rows[n:]
    parsed = [r["choice"] for r in rows if r["choice"] is not None]
    res = dict(model=str(path), items=n,
               acc_original=sum(r["correct"] for r in orig) / n, acc_swapped=sum(r["correct"] for r in swapped) / n,
               acc=sum(r["correct"] for r in rows) / len(rows),
               both_right=sum(a["correct"] and b["correct"] for a, b in zip(orig, swapped)) / n,
               answered_1=parsed.count(1) / max(1, len(parsed)),
               parse_fail=1 - len(parsed) / len(rows),
               format_ok=sum(core.format_ok(r["text"]) for r in rows) / len(rows))
    if args.vote_k:
        vjobs = [(it, swap) for swap in (False, True) for it in items[:args.vote_items]]
        samples = judge_all(model, processor, [j for j in vjobs for _ in range(args.vote_k)], temperature=1.0)
        votes, any_k = 0, 0
        for j, (it, swap) in enumerate(vjobs):
            label = 3 - it["label"] if swap else it["label"]
            choices = [core.parse_choice(t) for t in samples[j * args.vote_k:(j + 1) * args.vote_k]]
            votes += core.majority_vote(choices) == label
            any_k += label in choices
        res.update(vote_k=args.vote_k, vote_items=len(vjobs) // 2,
                   voting_at_k=votes / len(vjobs), any_at_k=any_k / len(vjobs))
    res["seconds"] = round(time.time() - t0, 1)
    name = Path(path).parent.name if Path(path).name == "model" else Path(path).name
    with open(out / f"generations_{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return name, res


results = {}
for path in args.models:
    if not Path(path).exists():
        raise SystemExit(f"checkpoint not found: {path} (run the earlier stages, or pass --models)")
    name, res = evaluate(path)
    results[name] = res
    print(f"{name}: " + " | ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)))

# ------------------------------------------------------------------------------------------ report
pct = lambda x: f"{100 * x:.1f}"
k = args.vote_k
lines = [f"| model | acc (original order) | acc (swapped) | **acc (both orders)** | both right | answered \"1\" | "
         f"parse fail | Voting@{k} | Any@{k} |", "|---" * 9 + "|"]
for name, r in results.items():
    vote = (pct(r["voting_at_k"]), pct(r["any_at_k"])) if k else ("-", "-")
    lines.append(f"| {name} | {pct(r['acc_original'])} | {pct(r['acc_swapped'])} | **{pct(r['acc'])}** | "
                 f"{pct(r['both_right'])} | {pct(r['answered_1'])} | {pct(r['parse_fail'])} | {vote[0]} | {vote[1]} |")
table = "\n".join(lines)
note = (f"\n\n{len(items)} items x 2 orders, greedy; Voting@{k} on {args.vote_items} items x 2 orders at T=1.0. "
        f"Data: {args.data}.\n")
(out / "eval.md").write_text(table + note)
(out / "eval.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=2))
print("\n" + table + note)
print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}")
