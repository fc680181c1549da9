"""
Where a judge trained on the template teacher goes wrong: the README's error table for the default easy-vqa pairs.

    python assets/error_kinds.py runs/i7e/eval_sft/generations_pairs_sft.jsonl runs/i7e/eval_long/generations_*.jsonl

For each wrong greedy answer, the first step of the teacher's template that the judge got wrong:
  0. the reasoning lacks "The correct answer is X." or either "Response N says Y, which is right|wrong.";
  1. "The image shows a C S."              a colour or shape word the teacher names is missing: it misdescribed
                                           the image (and then the answer X is wrong too);
  2. "The correct answer is X."            wrong X, though the description is right (or the teacher gives none):
                                           it answered the question wrong from what it saw;
  3. "Response N says Y, which is ..."     Y is not what response N says: the judge misread a response;
  4. otherwise                             a wrong "right/wrong" verdict or a final choice that does not follow.
Counts are per question type and in all, over items x orders. The truth comes from the pair file's teacher text.
A second table asks of every greedy answer, right or wrong, whether its "The image shows ..." names the colour and
the shape that the teacher's description names: how well the judge sees, apart from how well it reasons. It also
gives how often the judge's "The correct answer is" says "no" to yes/no questions and "yes" to negated ones, against
the truth: easy-vqa's yes/no answers are lopsided, so always answering the majority scores well without looking.
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
seen_in = lambda text: set((re.findall(r"The image shows an? ([a-z ]*)\.", text) or [""])[0].split())
kinds = ("left the template", "misdescribed the image", "answered the question wrong", "read a response",
         "verdict or conclusion")
SHAPES = ("circle", "rectangle", "triangle")
print("| model | type | n | wrong | " + " | ".join(kinds) + " |\n|---|---|---|---|---|---|---|---|---|")
named = {}                                                        # model -> Counter of described words, right/all
for path in args.generations:
    counts, words = defaultdict(Counter), Counter()
    for g in map(json.loads, open(path)):
        if g["mode"] != "greedy":
            continue
        if g["id"] not in pairs:
            raise SystemExit(f"{path}: item {g['id']} is not in {args.pairs}; pass the pair file it was generated from")
        pair, c = pairs[g["id"]], counts[g["category"]]
        c["n"] += 1
        for cat, majority in (("yes/no", "no"), ("negated yes/no", "yes")):
            if g["category"] == cat:
                words[cat] += 1
                words[cat + " says"] += answer_of(g["text"]) == majority
                words[cat + " truth"] += answer_of(pair["think"]) == majority
        for w in seen_in(pair["think"]):
            kind = "shape" if w in SHAPES else "colour"
            words[kind] += 1
            words[kind + " right"] += w in seen_in(g["text"])
        if core.parse_choice(g["text"]) == g["label"]:
            continue
        chosen, rejected = (pair["response1"], pair["response2"])[::1 if pair["label"] == 1 else -1]
        shown = (chosen, rejected) if g["order"] == "chosen_first" else (rejected, chosen)
        quoted = dict(re.findall(r"Response (\d) says (.+?), which is (?:right|wrong)\.", g["text"]))
        c["wrong"] += 1
        said = answer_of(g["text"]), (quoted.get("1"), quoted.get("2"))
        if None in (said[0], *said[1]):
            kind = kinds[0]
        elif said[0] != answer_of(pair["think"]):
            kind = kinds[1] if seen_in(pair["think"]) - seen_in(g["text"]) else kinds[2]
        else:
            kind = kinds[3] if said[1] != shown else kinds[4]
        c[kind] += 1
    name = Path(path).stem.removeprefix("generations_pairs_")
    named[name] = words
    counts["all"] = sum(counts.values(), Counter())
    for cat, c in sorted(counts.items()):
        print(f"| {name} | {cat} | {c['n']} | {c['wrong']} | " + " | ".join(str(c[k]) for k in kinds) + " |")
print('\n| model | colour named right | shape named right | yes/no: "no" (truth) | negated: "yes" (truth) |'
      "\n|---|---|---|---|---|")
share = lambda w, k, of: f"{w[k] / max(w[of], 1):.1%}"
for name, w in named.items():
    print(f"| {name} | " + " | ".join(f"{share(w, k + ' right', k)} of {w[k]}" for k in ("colour", "shape")) + " | "
          + " | ".join(f"{share(w, k + ' says', k)} ({share(w, k + ' truth', k)})" for k in ("yes/no", "negated yes/no")) + " |")
