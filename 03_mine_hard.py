"""
Stage 3: mine the hard items for RL (R1-Reward section 4.3, "progressive difficulty").

    python 03_mine_hard.py                                   # runs/02_sft/model on runs/01_data
    python 03_mine_hard.py --num-items 20000 --attempts 3

The paper asks GPT-4o each item up to 3 times and keeps the items it needed >= 2 attempts for, plus those
it never solved. Here the SFT model itself answers: attempt k runs only on the items still unsolved after
k-1 attempts. We sample at temperature 1.0, because at temperature 0 a local model gives the same answer
every time. difficulty = number of attempts until correct, or attempts + 1 if never solved; the RL set
keeps difficulty >= --min-difficulty (default 2: not solved on the first try).

--keep-easy F also keeps a random fraction F of the other items (default 0: the paper's hard set alone). A
hard set mined by a small judge holds the answers of lopsided question types about equally (it misses the
minority answer most), so RL on it alone can learn that balance; a share of easy items keeps the prior.

Reads runs/01_data/train_pairs.jsonl and runs/02_sft/model; writes runs/03_hard/{rl_pairs.jsonl, meta.json}.
"""
import argparse, json, os, random, time
from collections import Counter
from pathlib import Path
import torch
from tqdm import tqdm
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="runs/01_data/train_pairs.jsonl", help="pair file to mine")
p.add_argument("--model", default="runs/02_sft/model", help="the SFT checkpoint that answers")
p.add_argument("--out", default="runs/03_hard")
p.add_argument("--num-items", type=int, default=512, help="items to try (a random subset; 0 = all)")
p.add_argument("--attempts", type=int, default=3, help="K: attempts per item (paper: 3)")
p.add_argument("--min-difficulty", type=int, default=2, help="keep items needing at least this many attempts")
p.add_argument("--keep-easy", type=float, default=0.0, help="also keep this random fraction of the easier items (0 = hard items only, the paper)")
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--max-new-tokens", type=int, default=96)
p.add_argument("--batch-size", type=int, default=64)
core.add_vllm_flags(p, gpu_memory_utilization=0.5)                 # --vllm --gpu-memory-utilization ...
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--strict", action="store_true", help="a bad input row is an error naming file:line (default: skip and count it)")
p.add_argument("--max-prompt-tokens", type=int, default=2048, help="skip items whose prompt, image tokens included, is longer (0 = no limit)")
args = p.parse_args()
if not 0.0 <= args.keep_easy <= 1.0:
    p.error(f"--keep-easy must be in [0, 1], got {args.keep_easy}")
random.seed(args.seed)
torch.manual_seed(args.seed)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()

skipped = core.Skipped(args.strict)
items = core.load_items(args.data, skipped=skipped)
if args.num_items and args.num_items < len(items):
    items = random.sample(items, args.num_items)
from transformers import AutoProcessor
items = core.drop_long_prompts(items, AutoProcessor.from_pretrained(args.model), args.max_prompt_tokens, skipped)
if not items:                                                            # (only the sampled items: cheap)
    raise SystemExit(f"{args.data}: no usable items (skipped: {dict(skipped)})")
if args.vllm:
    engine = core.VLLMEngine.from_args(args, args.model, seed=args.seed)
    generate = lambda msgs: engine.sample(msgs, args.max_new_tokens, args.temperature)[1]
else:
    model, processor = core.load_policy(args.model, device=args.device)
    generate = lambda msgs: core.sample(model.eval(), processor, msgs, args.max_new_tokens, args.temperature, args.device)[1]
print(f"read {args.data} ({len(items)} items; skipped {dict(skipped) or 'none'}) and {args.model}")

# ------------------------------------------------------------------------------------------ attempts
difficulty = {}                                           # item index -> attempts needed (K + 1 = never)
stats = Counter()
todo = list(range(len(items)))
for attempt in range(1, args.attempts + 1):
    solved_now = 0
    for i in tqdm(range(0, len(todo), args.batch_size), desc=f"attempt {attempt}/{args.attempts}"):
        idx = todo[i:i + args.batch_size]
        msgs = [core.pair_view(items[j])[0] for j in idx]
        texts = generate(msgs)
        for j, text in zip(idx, texts):
            choice = core.parse_choice(text)
            stats["parse_fail"] += choice is None
            stats["format_ok"] += core.format_ok(text)
            stats["samples"] += 1
            if choice == items[j]["label"]:
                difficulty[j] = attempt
                solved_now += 1
    todo = [j for j in todo if j not in difficulty]
    print(f"attempt {attempt}: solved {solved_now}, still unsolved {len(todo)}")
for j in todo:
    difficulty[j] = args.attempts + 1

# ------------------------------------------------------------------------------------------ write the RL set
hist = Counter(difficulty.values())
kept = [j for j in range(len(items)) if difficulty[j] >= args.min_difficulty]
easy = [j for j in range(len(items)) if difficulty[j] < args.min_difficulty]
easy_kept = sorted(random.Random(args.seed).sample(easy, round(args.keep_easy * len(easy))))
hard_n, kept = len(kept), sorted(kept + easy_kept)
with open(out / "rl_pairs.jsonl", "w") as f:
    for j in kept:
        row = dict(items[j], difficulty=difficulty[j])
        row["image"] = os.path.relpath(row["image"], out)   # load_items resolves images relative to this file
        f.write(json.dumps(row) + "\n")
meta = dict(stage="03_mine_hard", args=vars(args), seconds=round(time.time() - t0, 1), tried=len(items),
            kept=len(kept), kept_hard=hard_n, kept_easy=len(easy_kept), difficulty_histogram={("never" if k > args.attempts else str(k)): v for k, v in sorted(hist.items())},
            first_try_accuracy=hist.get(1, 0) / len(items),
            parse_fail_rate=stats["parse_fail"] / stats["samples"], format_rate=stats["format_ok"] / stats["samples"],
            kept_label_balance=dict(Counter(items[j]["label"] for j in kept)), skipped_items=skipped)
(out / "meta.json").write_text(json.dumps(meta, indent=2))
print(json.dumps({k: v for k, v in meta.items() if k != "args"}, indent=1))
print(f"wrote {out / 'rl_pairs.jsonl'} ({len(kept)} items), {out / 'meta.json'}")
