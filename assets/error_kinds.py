"""
Where a judge trained on the template teacher goes wrong: the README's error table for the default easy-vqa pairs.

    python assets/error_kinds.py runs/i7e/eval_sft/generations_pairs_sft.jsonl runs/i7e/eval_long/generations_*.jsonl

For each wrong greedy answer, the first step of the teacher's template that the judge got wrong:
  0. the reasoning lacks "The correct answer is X." or either "Response N says Y, which is right|wrong.";
  1. "The correct answer is X."            wrong X: the judge misread the image (or the question);
  2. "Response N says Y, which is ..."     Y is not what response N says: the judge misread a response;
  3. otherwise                             a wrong "right/wrong" verdict or a final choice that does not follow.
Counts are per question type and in all, over items x orders. The truth comes from the pair file's teacher text.
"""
import argparse, json, re, sys
from collections import Counter, defaultdict
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stable_reinforce_core as core

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("generations", nargs="+", help="05_eval.py generations_pairs_*.jsonl files")
p.add_argument("--pairs", default="runs/01_data/test_pairs.jsonl", help="the pair file they were generated from")
args = p.parse_args()

pairs = {row["id"]: row for row in map(json.loads, open(args.pairs))}
answer_of = lambda text: (re.findall(r"The correct answer is (\w+)\.", text) or [None])[0]
kinds = ("left the template", "read the image", "read a response", "verdict or conclusion")
print("| model | type | n | wrong | " + " | ".join(kinds) + " |\n|---|---|---|---|---|---|---|---|")
for path in args.generations:
    counts = defaultdict(Counter)
    for g in map(json.loads, open(path)):
        if g["mode"] != "greedy":
            continue
        if g["id"] not in pairs:
            raise SystemExit(f"{path}: item {g['id']} is not in {args.pairs}; pass the pair file it was generated from")
        pair, c = pairs[g["id"]], counts[g["category"]]
        c["n"] += 1
        if core.parse_choice(g["text"]) == g["label"]:
            continue
        chosen, rejected = (pair["response1"], pair["response2"])[::1 if pair["label"] == 1 else -1]
        shown = (chosen, rejected) if g["order"] == "chosen_first" else (rejected, chosen)
        quoted = dict(re.findall(r"Response (\d) says (.+?), which is (?:right|wrong)\.", g["text"]))
        c["wrong"] += 1
        said = answer_of(g["text"]), (quoted.get("1"), quoted.get("2"))
        c[kinds[0] if None in (said[0], *said[1]) else kinds[1] if said[0] != answer_of(pair["think"]) else
          kinds[2] if said[1] != shown else kinds[3]] += 1
    name = Path(path).stem.removeprefix("generations_pairs_")
    counts["all"] = sum(counts.values(), Counter())
    for cat, c in sorted(counts.items()):
        print(f"| {name} | {cat} | {c['n']} | {c['wrong']} | " + " | ".join(str(c[k]) for k in kinds) + " |")
