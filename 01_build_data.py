"""
Stage 1: build pairwise preference data with teacher-written reasoning (R1-Reward section 4.3).

    python 01_build_data.py                      # embedded default: easy-vqa -> runs/01_data
    python 01_build_data.py --source jsonl --pairs my_pairs.jsonl

Each item is a quadruple (question, response 1, response 2, which is better), with the better response
at position 1 or 2 in an exact 1:1 balance. The paper has GPT-4o write the cold-start reasoning; offline,
a deterministic template teacher stands in for it: what the image shows, what each response claims,
which one matches. The cold-start data must also teach a from-scratch model to *see*, so we also write
plain VQA items (image + question -> one-word answer) for 02_sft.py to mix in.

Writes (under --out): train_pairs.jsonl, test_pairs.jsonl, train_vqa.jsonl, images/, meta.json.
"""
import argparse, json, random, re, time
from collections import Counter, defaultdict
from pathlib import Path
from PIL import Image
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/01_data", help="output folder")
p.add_argument("--source", default="easy-vqa", choices=["easy-vqa", "jsonl"], help="where the pairs come from")
p.add_argument("--pairs", default=None, help="--source jsonl: a pair file in the schema of stable_reinforce_core.load_items")
p.add_argument("--train-pairs", type=int, default=20000, help="training pairs to build (at most one per question)")
p.add_argument("--test-pairs", type=int, default=1000, help="held-out test pairs (from easy-vqa's test split)")
p.add_argument("--image-size", type=int, default=112, help="easy-vqa's 64 px images are upscaled to this (28-px multiple)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--strict", action="store_true", help="--source jsonl: a bad row is an error naming file:line (default: skip and count)")
args = p.parse_args()
rng = random.Random(args.seed)
out = Path(args.out)
(out / "images").mkdir(parents=True, exist_ok=True)
t0 = time.time()

# ------------------------------------------------------------------------------------------ the template teacher
COLORS = ["red", "green", "blue", "black", "gray", "yellow", "brown", "teal"]
SHAPES = ["circle", "rectangle", "triangle"]


def wrong_answer(answer):
    """A wrong response of the same kind as the right one: yes <-> no, another colour, another shape."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    pool = COLORS if answer in COLORS else SHAPES
    return rng.choice([a for a in pool if a != answer])


def teacher(facts, answer, r1, r2, label):
    """Cold-start reasoning: see, compare, conclude. Ends with the "Response N is better" statement
    that the rule consistency judge (stable_reinforce_core.RuleJudge) reads."""
    seen = " ".join(x for x in (facts.get("color"), facts.get("shape")) if x)
    think = f"The image shows a {seen}. " if seen else ""
    if answer is not None:
        think += f"The correct answer is {answer}. "
    for n, r in ((1, r1), (2, r2)):
        verdict = "" if answer is None else (", which is right" if n == label else ", which is wrong")
        think += f"Response {n} says {r}{verdict}. "
    return think + f"Response {label} is better."


def image_facts(questions, answers, image_ids):
    """easy-vqa gives questions, not captions: recover each image's colour and shape from its Q/A."""
    facts = defaultdict(dict)
    for q, a, i in zip(questions, answers, image_ids):
        if a in COLORS:
            facts[i]["color"] = a
        elif a in SHAPES:
            facts[i]["shape"] = a
        elif a == "yes" and " not " not in f" {q} " and not q.startswith("is no "):   # "is there a red shape?"
            for w in re.findall(r"[a-z]+", q):
                facts[i].update({"color": w} if w in COLORS else {"shape": w} if w in SHAPES else {})
    return facts


def save_image(src, name):
    """Copy one image, upscaled so the processor sees more than 4 vision tokens; returns its relative path."""
    rel = f"images/{name}.png"
    if not (out / rel).exists():
        Image.open(src).convert("RGB").resize((args.image_size, args.image_size), Image.NEAREST).save(out / rel)
    return rel


def easy_vqa_split(split, n_pairs):
    import easy_vqa
    qs, ans, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    facts = image_facts(qs, ans, ids)
    order = rng.sample(range(len(qs)), min(n_pairs, len(qs)))
    labels = [1, 2] * (len(order) // 2) + [1] * (len(order) % 2)       # exact 1:1 balance of positions
    rng.shuffle(labels)
    pairs, vqa = [], []
    for k, label in zip(order, labels):
        right, wrong = ans[k], wrong_answer(ans[k])
        r1, r2 = (right, wrong) if label == 1 else (wrong, right)
        img = save_image(paths[ids[k]], f"{split}_{ids[k]}")
        pairs.append(dict(id=f"{split}-{k}", image=img, question=qs[k], response1=r1, response2=r2, label=label,
                          think=teacher(facts[ids[k]], right, r1, r2, label), source="easy-vqa"))
        vqa.append(dict(id=f"{split}-{k}", image=img, question=qs[k], answer=right))
    return pairs, vqa


skipped = core.Skipped(args.strict)      # bad rows of --pairs, by reason (prompt length is checked from 02 on)


def jsonl_source(path):
    """A user's own pair file, validated row by row: bad rows are skipped and counted (--strict: an error)."""
    items = core.load_items(path, skipped=skipped)
    pairs = []
    for it in items:
        img = save_image(it["image"], f"user_{len(pairs)}")
        think = it.get("think") or teacher({}, None, it["response1"], it["response2"], it["label"])
        pairs.append(dict(it, image=img, think=think, source=it.get("source", Path(path).name)))
    rng.shuffle(pairs)
    n_test = min(args.test_pairs, len(pairs) // 10)
    return pairs[n_test:], pairs[:n_test]


# ------------------------------------------------------------------------------------------ build and write
if args.source == "easy-vqa":
    train, train_vqa = easy_vqa_split("train", args.train_pairs)
    test, _ = easy_vqa_split("test", args.test_pairs)
else:
    if not args.pairs:
        p.error("--source jsonl needs --pairs FILE")
    train, test = jsonl_source(args.pairs)
    train_vqa = []


def write_jsonl(name, rows):
    with open(out / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out / name}: {len(rows)} rows")


write_jsonl("train_pairs.jsonl", train)
write_jsonl("test_pairs.jsonl", test)
write_jsonl("train_vqa.jsonl", train_vqa)
meta = dict(stage="01_build_data", args=vars(args), seconds=round(time.time() - t0, 1),
            counts=dict(train_pairs=len(train), test_pairs=len(test), train_vqa=len(train_vqa),
                        images=len(list((out / "images").iterdir()))),
            train_label_balance=dict(Counter(r["label"] for r in train)),
            test_label_balance=dict(Counter(r["label"] for r in test)), skipped_items=skipped,
            example=train[0] if train else None)
(out / "meta.json").write_text(json.dumps(meta, indent=2))
print(f"wrote {out / 'meta.json'}  ({meta['seconds']} s); skipped input rows: {dict(skipped) or 'none'}")
print("example:", json.dumps(train[0])[:400] if train else "none")
