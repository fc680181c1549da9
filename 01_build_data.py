"""
Stage 1: build pairwise preference data with teacher-written reasoning (R1-Reward section 4.3).

    python 01_build_data.py                      # embedded default: easy-vqa -> runs/01_data
    python 01_build_data.py --source jsonl --pairs my_pairs.jsonl
    python 01_build_data.py --source hub --hub rlaif-v wildvision --max-per-source 5000 \
        --teacher-url http://localhost:8000/v1 --teacher-model Qwen/Qwen2.5-VL-72B-Instruct
    python 01_build_data.py --source hub --hub povid --local povid=POVID.json --image-root povid=coco/train2014

Each item is a quadruple (question, response 1, response 2, which is better), with the better response
at position 1 or 2 in an exact 1:1 balance. The paper has GPT-4o write the cold-start reasoning; offline,
a deterministic template teacher stands in for it: what the image shows, what each response claims,
which one matches. The cold-start data must also teach a from-scratch model to *see*, so we also write
plain VQA items (image + question -> one-word answer) for 02_sft.py to mix in.
--source hub reads the released RL set and the R1-Reward-200K sources through `datasets` (SOURCES below),
and --teacher-url asks a real teacher (section 4.2: up to 3 attempts, the count kept as "difficulty").

Writes (under --out): train_pairs.jsonl, test_pairs.jsonl, train_vqa.jsonl, images/, meta.json.
"""
import argparse, base64, io, json, os, random, re, shutil, socket, time
from collections import Counter, defaultdict
from urllib.parse import urlparse
from pathlib import Path
from PIL import Image
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/01_data", help="output folder")
p.add_argument("--source", default="easy-vqa", choices=["easy-vqa", "jsonl", "hub"], help="where the pairs come from")
p.add_argument("--pairs", default=None, help="--source jsonl: a pair file in the schema of stable_reinforce_core.load_items")
p.add_argument("--hub", nargs="+", default=["mmrlhf", "rlaif-v", "vlfeedback", "povid", "wildvision"], help="--source hub: "
               "sources to read (SOURCES below; default: the R1-Reward-200K ones; r1-rl is the released RL set)")
p.add_argument("--local", action="append", default=[], metavar="NAME=PATH", help="source NAME from a local copy instead")
p.add_argument("--image-root", action="append", default=[], metavar="NAME=DIR", help="where NAME's image paths start")
p.add_argument("--max-per-source", type=int, default=0, help="a seeded random subset of this many rows per source (0 = all)")
p.add_argument("--download-timeout", type=float, default=60.0, help="seconds per download request of a --local URL")
p.add_argument("--cache-dir", default=None, help="datasets cache folder (default: the datasets default)")
p.add_argument("--teacher-url", default=None, help="--source hub: OpenAI-compatible teacher (default: the template teacher)")
p.add_argument("--teacher-model", default=None, help="the teacher's name there (paper: GPT-4o)")
p.add_argument("--teacher-attempts", type=int, default=3, help="tries until the teacher's choice matches the label (paper: 3)")
p.add_argument("--teacher-temperature", type=float, default=0.0, help="paper: 0 (then attempts 2-3 rarely differ)")
p.add_argument("--teacher-timeout", type=float, default=120.0, help="seconds per teacher request")
p.add_argument("--teacher-retries", type=int, default=2, help="retries per call (timeouts, connection errors, 5xx); 64 in flight")
p.add_argument("--train-pairs", type=int, default=20000, help="training pairs to build (at most one per question)")
p.add_argument("--test-pairs", type=int, default=1000, help="held-out test pairs (easy-vqa: its test split; else <= 10%%)")
p.add_argument("--ground-yes-no", action="store_true", help="easy-vqa: the teacher also writes the step from the image "
               "to a yes/no answer ('The shape is gray, not red, so the answer is no.')")
p.add_argument("--balance-answers", action="store_true", help="easy-vqa: as many 'yes' as 'no' in each yes/no question "
               "type (easy-vqa has ~80%% one answer, which a judge can score without looking at the image)")
p.add_argument("--image-size", type=int, default=112, help="easy-vqa's 64 px images are upscaled to this (28-px multiple)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--strict", action="store_true", help="--source jsonl: a bad row is an error naming file:line (default: skip and count)")
args = p.parse_args()
if bool(args.teacher_url) != bool(args.teacher_model):
    p.error("--teacher-url and --teacher-model go together")
if args.teacher_url and args.source != "hub":
    p.error("--teacher-url is for --source hub; the easy-vqa and jsonl paths keep the template teacher")
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


def teacher(facts, answer, r1, r2, label, question=None):
    """Cold-start reasoning: see, compare, conclude. Ends with the "Response N is better" statement
    that the rule consistency judge (stable_reinforce_core.RuleJudge) reads. With a question (--ground-yes-no),
    a yes/no answer is first derived from what the image shows (yes_no_step)."""
    seen = " ".join(x for x in (facts.get("color"), facts.get("shape")) if x)
    think = f"The image shows a {seen}. " if seen else ""
    if question and answer in ("yes", "no"):
        think += yes_no_step(question, facts, answer)
    if answer is not None:
        think += f"The correct answer is {answer}. "
    for n, r in ((1, r1), (2, r2)):
        verdict = "" if answer is None else (", which is right" if n == label else ", which is wrong")
        think += f"Response {n} says {r}{verdict}. "
    return think + f"Response {label} is better."


def yes_no_step(question, facts, answer):
    """The step a yes/no answer hides: compare the asked colour or shape with the image's, then apply the negation.
    "is there not a red shape?" about a gray circle -> "The question asks about red. The shape is gray, not red; the
    question is negated, so the answer is yes." Where the image's value is unknown: "The shape is not red"."""
    w = next(x for x in re.findall(r"[a-z]+", question) if x in COLORS or x in SHAPES)  # easy-vqa: exactly one
    kind, a = ("color", "") if w in COLORS else ("shape", "a ")
    negated = question_type(question, answer) == "negated yes/no"
    present = (answer == "yes") != negated                        # does the image have the asked colour/shape?
    seen = facts.get(kind)
    is_ = f"{a}{w}" if present else f"{a}{seen}, not {a}{w}" if seen else f"not {a}{w}"
    return (f"The question asks about {a}{w}. The shape is {is_}" + ("; the question is negated" if negated else "")
            + f", so the answer is {answer}. ")


def question_type(question, answer):
    """The item's category, which 05_eval.py reports accuracy by: colour, shape, yes/no or negated yes/no
    ("is there not a red shape?", "is no circle present?")."""
    negated = " not " in f" {question} " or question.startswith("is no ")
    return "colour" if answer in COLORS else "shape" if answer in SHAPES else "negated yes/no" if negated else "yes/no"


def image_facts(questions, answers, image_ids):
    """easy-vqa gives questions, not captions: recover each image's colour and shape from its Q/A."""
    facts = defaultdict(dict)
    for q, a, i in zip(questions, answers, image_ids):
        if a in COLORS:
            facts[i]["color"] = a
        elif a in SHAPES:
            facts[i]["shape"] = a
        elif question_type(q, a) == "yes/no" and a == "yes":                   # "is there a red shape?"
            for w in re.findall(r"[a-z]+", q):
                facts[i].update({"color": w} if w in COLORS else {"shape": w} if w in SHAPES else {})
    return facts


def save_image(src, name):
    """Copy one image, upscaled so the processor sees more than 4 vision tokens; returns its relative path."""
    rel = f"images/{name}.png"
    if not (out / rel).exists():
        Image.open(src).convert("RGB").resize((args.image_size, args.image_size), Image.NEAREST).save(out / rel)
    return rel


def balanced_yes_no(qs, ans):
    """--balance-answers: the kept question indices. All colour and shape questions; in each yes/no type, as many
    "yes" as "no" (a random subset of the majority answer, which is ~80% of easy-vqa's yes/no questions)."""
    groups = defaultdict(list)
    for k, (q, a) in enumerate(zip(qs, ans)):
        groups[question_type(q, a), a].append(k)
    n = {kind: min(len(groups[kind, "yes"]), len(groups[kind, "no"])) for kind in ("yes/no", "negated yes/no")}
    return sorted(k for (kind, _), ks in groups.items() for k in (rng.sample(ks, n[kind]) if kind in n else ks))


def easy_vqa_split(split, n_pairs):
    import easy_vqa
    qs, ans, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    facts = image_facts(qs, ans, ids)
    pool = balanced_yes_no(qs, ans) if args.balance_answers else range(len(qs))
    order = rng.sample(pool, min(n_pairs, len(pool)))
    labels = [1, 2] * (len(order) // 2) + [1] * (len(order) % 2)       # exact 1:1 balance of positions
    rng.shuffle(labels)
    pairs, vqa = [], []
    for k, label in zip(order, labels):
        right, wrong = ans[k], wrong_answer(ans[k])
        r1, r2 = (right, wrong) if label == 1 else (wrong, right)
        img = save_image(paths[ids[k]], f"{split}_{ids[k]}")
        pairs.append(dict(id=f"{split}-{k}", image=img, question=qs[k], response1=r1, response2=r2, label=label,
                          think=teacher(facts[ids[k]], right, r1, r2, label, args.ground_yes_no and qs[k]),
                          source="easy-vqa", category=question_type(qs[k], right)))
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


# ---------------------------------------------------------------------------- real sources (paper section 4.3, Table 2)
class Drop(Exception):       # a row that cannot become a pair; the message is the reason it is counted under
    pass


TEMPLATE_RE = re.compile(re.escape(core.PROMPT_TEMPLATE).replace(r"\{question\}", "(.*)").replace(
    r"\{answer1\}", "(.*)").replace(r"\{answer2\}", "(.*)"), re.DOTALL)


def from_r1_rl(row):
    """yifanzhang114/R1-Reward-RL: question, message (a JSON chat whose text is the full Table 1 prompt), answer
    (["<answer>2</answer>"]), image. The responses are recovered by matching the prompt against the template."""
    turn = json.loads(row["message"]) if isinstance(row["message"], str) else row["message"]
    text = next(c["text"] for c in turn[0]["content"] if c.get("type") == "text")
    m = TEMPLATE_RE.fullmatch(text)
    if m is None:
        raise Drop("prompt is not the Table 1 template")
    answer = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
    label = core.parse_choice(answer or "")
    if label is None:
        raise Drop("answer is not <answer>1|2</answer>")
    r1, r2 = m.group(2), m.group(3)
    return dict(question=row.get("question") or m.group(1), chosen=r1 if label == 1 else r2,
                rejected=r2 if label == 1 else r1, image=row["image"])


def from_mmrlhf(row):
    """yifanzhang114/MM-RLHF dpo_pairs.jsonl: prompt, chosen, rejected, image (e.g. long/x.jpg) or video.
    The first folder of the image path is the subset (long / short / mcq / safety)."""
    if row.get("video"):
        raise Drop("video (R1-Reward has none)")
    subset = next((s for s in ("long", "short", "mcq", "safety") if s in Path(row["image"]).parts), None)
    if subset is None:
        raise Drop("image path names no subset (long/short/mcq/safety)")
    return dict(question=row["prompt"], chosen=row["chosen"], rejected=row["rejected"], image=row["image"],
                source=f"mmrlhf-{subset}")


def from_rlaif_v(row):
    """openbmb/RLAIF-V-Dataset: question, chosen, rejected, image (embedded)."""
    return dict(question=row["question"], chosen=row["chosen"], rejected=row["rejected"], image=row["image"])


def mean_rating(completion):
    """VLFeedback: the mean of a response's numeric aspect ratings, or None (some ratings are "N/A")."""
    r = [float(a["Rating"]) for a in (completion.get("annotations") or {}).values()
         if a and re.fullmatch(r"\d+(\.\d+)?", str(a["Rating"]))]
    return sum(r) / len(r) if r else None


def from_vlfeedback(row):
    """MMInstruction/VLFeedback: prompt, img_path, completions (response, annotations: aspect -> Rating "1".."5").
    Chosen = the best mean rating, rejected = the worst; ties and unrated answers are dropped."""
    comps = row["completions"]
    if isinstance(comps, dict):                                   # parquet: a struct of lists
        comps = [dict(zip(comps, vals)) for vals in zip(*comps.values())]
    rated = sorted((m, c["response"]) for c in comps if c.get("response") and (m := mean_rating(c)) is not None)
    if len(rated) < 2 or rated[0][0] == rated[-1][0]:
        raise Drop("fewer than 2 rated responses" if len(rated) < 2 else "all ratings tie")
    return dict(question=row["prompt"], chosen=rated[-1][1], rejected=rated[0][1], image=row["img_path"])


def from_povid(row):
    """YiyangAiLab/POVID_preference_data_for_VLLMs (LLaVA style): conversations (the human turn) or prompt,
    chosen, rejected, image (a COCO train2014 file name: point --image-root povid=... at those images)."""
    question = row.get("prompt") or next(t["value"] for t in row["conversations"] if t["from"] == "human")
    return dict(question=question.replace("<image>", "").strip(), chosen=row["chosen"], rejected=row["rejected"],
                image=row["image"])


def from_wildvision(row):
    """WildVision/wildvision-battle: conversation_a/_b (role, content), winner, turn, image. Single-turn battles
    with a decisive winner only ("tie" and "tie (bothbad)" are dropped)."""
    if row["winner"] not in ("model_a", "model_b"):
        raise Drop("no decisive winner")
    if (row.get("turn") or 1) > 1:
        raise Drop("multi-turn battle")
    say = lambda conv, role: next(t["content"] for t in conv if t["role"] == role)
    a, b = say(row["conversation_a"], "assistant"), say(row["conversation_b"], "assistant")
    return dict(question=say(row["conversation_a"], "user"), chosen=a if row["winner"] == "model_a" else b,
                rejected=b if row["winner"] == "model_a" else a, image=row["image"])


SOURCES = {   # name: (hub id, files to read there or None for its default, row -> pair)
    "r1-rl": ("yifanzhang114/R1-Reward-RL", None, from_r1_rl),
    "mmrlhf": ("yifanzhang114/MM-RLHF", "dpo_pairs.jsonl", from_mmrlhf),
    "rlaif-v": ("openbmb/RLAIF-V-Dataset", None, from_rlaif_v),
    "vlfeedback": ("MMInstruction/VLFeedback", "vlfeedback_80k.jsonl", from_vlfeedback),
    "povid": ("YiyangAiLab/POVID_preference_data_for_VLLMs", "*.json", from_povid),
    "wildvision": ("WildVision/wildvision-battle", None, from_wildvision),
}


def save_any_image(img, root, name):
    """An image as a source gives it (a PIL image, {"bytes", "path"}, a path relative to root, or base64) ->
    images/<name>.<ext> under --out. Raises Drop if it is missing or cannot be read."""
    img = (img.get("bytes") or img.get("path")) if isinstance(img, dict) else img
    try:
        if isinstance(img, str) and (root / img).is_file():
            rel = f"images/{name}{Path(img).suffix.lower()}"
            shutil.copyfile(root / img, out / rel)
        else:
            rel = f"images/{name}.png"
            pil = img if hasattr(img, "save") else Image.open(io.BytesIO(
                base64.b64decode(img, validate=True) if isinstance(img, str) else img))
            pil.convert("RGB").save(out / rel)
        Image.open(out / rel).size                                    # a header we can read, or Drop
        return rel
    except Exception:
        raise Drop("image not found or unreadable") from None


def load_source(name):
    """(rows, image root) of one source, through `datasets`: from --local NAME=PATH if given, else from the hub.
    Image paths are relative to --image-root NAME=DIR, else to the local copy's folder, else to the current one.
    A source that cannot be read stops the build, naming the source and how to point at a local copy."""
    import datasets
    hub_id, files, _ = SOURCES[name]
    local, kw = dict(a.split("=", 1) for a in args.local).get(name), dict(split="train", cache_dir=args.cache_dir)
    root = dict(a.split("=", 1) for a in args.image_root).get(name) or (
        local if local and Path(local).is_dir() else Path(local).parent if local and Path(local).is_file() else ".")
    how = f"point at a local copy with --local {name}=PATH (a .parquet/.json/.jsonl file, a folder of them, or a URL)"
    try:
        if local:
            local = sorted(str(f) for e in ("parquet", "jsonl", "json") for f in Path(local).glob(f"*.{e}")) \
                if Path(local).is_dir() else [local]
            import aiohttp                                        # a timeout for URLs (datasets has none by default)
            opts = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=args.download_timeout)}}
            return datasets.load_dataset("parquet" if local[0].endswith(".parquet") else "json", data_files=local,
                                         storage_options=opts, download_config=datasets.DownloadConfig(
                                             max_retries=1, storage_options=opts), **kw), Path(root)
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))   # fail at once, not after retries
        if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):   # offline: the cache
            try:
                socket.create_connection((host.hostname, host.port or (80 if host.scheme == "http" else 443)), 5).close()
            except OSError:
                raise SystemExit(f"source {name}: the hub ({hub_id}) cannot be reached from here; {how}") from None
        return datasets.load_dataset(hub_id, data_files=files, **kw), Path(root)
    except SystemExit:
        raise
    except Exception as e:
        raise SystemExit(f"source {name}: could not load {local or hub_id}: {type(e).__name__}: {e}; {how}") from None


def hub_pairs():
    """Every --hub source mapped to the one pair schema, positions balanced 1:1 per source; drops counted by reason."""
    pairs, report = [], {}
    for name in args.hub:
        rows, root = load_source(name)
        rows = rows.shuffle(seed=args.seed) if args.max_per_source else rows   # a seeded random subset, not the head
        n = len(rows) if not args.max_per_source else min(args.max_per_source, len(rows))
        kept, dropped = [], Counter()
        for k in range(n):
            try:
                pair = SOURCES[name][2](rows[k])
                if not all(isinstance(pair[f], str) and pair[f].strip() for f in ("question", "chosen", "rejected")):
                    raise Drop("empty or non-text question/response")
                if pair["chosen"].strip() == pair["rejected"].strip():
                    raise Drop("identical responses")
                pair["image"] = save_any_image(pair["image"], root, f"{name}_{k}")
                kept.append(pair)
            except Drop as e:
                dropped[str(e)] += 1
            except Exception as e:                            # e.g. a missing field, or an embedded image that
                dropped[f"malformed row ({type(e).__name__})"] += 1   # datasets cannot decode: count it, go on
        labels = [1, 2] * (len(kept) // 2) + [1] * (len(kept) % 2)       # exact 1:1 balance of positions
        rng.shuffle(labels)
        for k, (pair, label) in enumerate(zip(kept, labels)):
            r1, r2 = (pair["chosen"], pair["rejected"]) if label == 1 else (pair["rejected"], pair["chosen"])
            pairs.append(dict(id=f"{name}-{k}", image=pair["image"], question=pair["question"], response1=r1,
                              response2=r2, label=label, source=pair.get("source", name)))
        report[name] = dict(rows=n, kept=len(kept), by_source=dict(Counter(p.get("source", name) for p in kept)),
                            dropped=dict(dropped))
        print(f"{name}: {n} rows read, {len(kept)} kept, dropped {dict(dropped) or 'none'}")
    return pairs, report


def teacher_api(pairs):
    """Cold-start reasoning from a real teacher (section 4.2): the Table 1 prompt with the image, asked up to
    --teacher-attempts times until the teacher's choice matches the label, in a correct format. difficulty =
    the attempt that succeeded, attempts + 1 if none did (such items keep no "think"). An item whose call fails
    (network, timeout, 5xx after retries) is dropped and counted: its difficulty is unknown."""
    client = core.ChatClient(args.teacher_url, args.teacher_model, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                             timeout=args.teacher_timeout, retries=args.teacher_retries, concurrency=64,
                             temperature=args.teacher_temperature, max_tokens=2048)
    job = lambda q: lambda: core.user_turn(core.PROMPT_TEMPLATE.format(
        question=q["question"], answer1=q["response1"], answer2=q["response2"]), out / q["image"])
    parse = lambda text: (core.parse_choice(text), text.strip()[7:].split("</think>")[0].strip()
                          if core.format_ok(text) else None)
    todo, failed = list(range(len(pairs))), set()
    for attempt in range(1, args.teacher_attempts + 1):
        replies = client.map([job(pairs[i]) for i in todo], parse)
        failed |= {i for i, r in zip(todo, replies) if r is None}
        for i, r in zip(todo, replies):
            if r is not None and r[0] == pairs[i]["label"] and r[1]:
                pairs[i].update(think=r[1], difficulty=attempt)
        todo = [i for i in todo if "difficulty" not in pairs[i] and i not in failed]
        print(f"teacher attempt {attempt}: {len(todo)} items still unsolved, {len(failed)} failed calls")
    for i in todo:
        pairs[i]["difficulty"] = args.teacher_attempts + 1
        pairs[i].pop("think", None)
    return [q for i, q in enumerate(pairs) if i not in failed], len(failed), client.stats


# ------------------------------------------------------------------------------------------ build and write
report = {}                                               # validation report: counts per source, drops by reason
if args.source == "easy-vqa":
    train, train_vqa = easy_vqa_split("train", args.train_pairs)
    test, _ = easy_vqa_split("test", args.test_pairs)
elif args.source == "jsonl":
    if not args.pairs:
        p.error("--source jsonl needs --pairs FILE")
    train, test = jsonl_source(args.pairs)
    train_vqa = []
else:
    if not set(args.hub) <= set(SOURCES):
        p.error(f"--hub: unknown source(s) {sorted(set(args.hub) - set(SOURCES))}; known: {sorted(SOURCES)}")
    pairs, report = hub_pairs()
    rng.shuffle(pairs)
    n_test = min(args.test_pairs, len(pairs) // 10)
    train, test, train_vqa = pairs[n_test:], pairs[:n_test], []
    if args.teacher_url:
        train, n_failed, teacher_stats = teacher_api(train)
        report["teacher"] = dict(teacher_stats, dropped_failed_calls=n_failed,
                                 difficulty=dict(Counter(r["difficulty"] for r in train)))
    else:
        for r in train + test:
            r["think"] = teacher({}, None, r["response1"], r["response2"], r["label"])


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
if report:
    meta["report"] = report
(out / "meta.json").write_text(json.dumps(meta, indent=2))
print(f"wrote {out / 'meta.json'}  ({meta['seconds']} s); skipped input rows: {dict(skipped) or 'none'}")
print("example:", json.dumps(train[0])[:400] if train else "none")
