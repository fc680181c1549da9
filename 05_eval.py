"""
Stage 5: evaluate reward-model checkpoints on held-out pairs or on the paper's three benchmarks (section 5.1),
in BOTH response orders, with Voting@K. Scoring is separate from generation, and runs resume.

    python 05_eval.py                                          # easy-vqa test pairs; runs/02_sft + runs/04_rl
    python 05_eval.py --bench vl_rewardbench --data data.jsonl --images DIR --models yifanzhang114/R1-Reward
    python 05_eval.py --bench mm_rlhf --hub --order chosen-first --vote-k 15     # the paper's protocol
    python 05_eval.py --rescore runs/05_eval/generations_*.jsonl                 # metrics only, no model

Benchmarks (files and categories: README, stage 5): vl_rewardbench (R1's data.jsonl; hub MMInstruction/VL-RewardBench),
mm_rlhf (mm_reward_bench.jsonl + images/; hub yifanzhang114/MM-RLHF-RewardBench), mmrb (Multimodal RewardBench's
all_data.json + data/; GitHub only), pairs (the 01 schema; the default).
The official scripts always show the chosen response first, so a judge that always answers "1" scores 100%
there. By default every item is judged in both orders and each order counts once;
--order chosen-first gives the paper's protocol. Metrics (stable_reinforce_core.metrics): accuracy, per category,
macro (VL-RewardBench), Acc+ (MM-RLHF), accuracy per order, both right, the "1" rate, parse failures,
Voting@K = majority of K samples at temperature 1.0 (paper s5.1) and Any@K.
A video (MM-RLHF's 25 video pairs) is a folder of frames: --video-frames of them, sorted by name and uniformly
spaced (core.sample_frames), each downscaled like an image, then judged as one video entry of the chat turn.
Generations go to generations_<bench>_<model>.jsonl (one row per item x order x sample), appended and flushed per
batch: a re-run skips the jobs already saved. Bad rows are skipped and counted by reason (--strict: error).
Writes <out>/{eval.json, eval.md, generations_*.jsonl}.
"""
import argparse, json, math, os, socket, time
from collections import Counter
from pathlib import Path
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--bench", default="pairs", choices=["pairs", "vl_rewardbench", "mm_rlhf", "mmrb"])
p.add_argument("--data", default=None, help="benchmark file (pairs: runs/01_data/test_pairs.jsonl)")
p.add_argument("--images", default=None, help="folder the image paths are relative to (default: the file's folder)")
p.add_argument("--hub", action="store_true", help="fetch the benchmark from the Hugging Face hub instead of --data")
p.add_argument("--models", nargs="+", default=["runs/02_sft/model", "runs/04_rl/model"], help="checkpoints to compare")
p.add_argument("--out", default="runs/05_eval")
p.add_argument("--order", default="both", choices=["both", "chosen-first"], help="chosen-first = the paper's protocol")
p.add_argument("--num-items", type=int, default=None, help="first N valid items; 0 = all (default: 400 pairs, all else)")
p.add_argument("--vote-k", type=int, default=5, help="samples per item and order for Voting@K (0 = skip)")
p.add_argument("--vote-items", type=int, default=None, help="items for Voting@K; 0 = all (default: 100 pairs, all else)")
p.add_argument("--max-new-tokens", type=int, default=96, help="paper: 1024 for RL, 4096 in the eval scripts")
p.add_argument("--max-pixels", type=int, default=1003520 // 2, help="larger images are downscaled (R1 eval: 501,760)")
p.add_argument("--video-frames", type=int, default=8, help="frames per video, an even number (R1's eval: 32)")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--strict", action="store_true", help="a bad row is an error naming file:line, not a counted skip")
p.add_argument("--fresh", action="store_true", help="delete saved generations instead of resuming from them")
p.add_argument("--rescore", nargs="+", default=None, metavar="GENERATIONS", help="score saved generations only")
core.add_vllm_flags(p, gpu_memory_utilization=0.5)     # --vllm: one engine; later --models are synced into it
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default=None, help="default: cuda if available")
args = p.parse_args()
if args.video_frames < 2 or args.video_frames % 2:
    p.error("--video-frames must be even and >= 2 (Qwen2.5-VL's temporal patch is 2 frames)")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
pairs = args.bench == "pairs"
num_items = args.num_items if args.num_items is not None else (400 if pairs else 0)
vote_items = args.vote_items if args.vote_items is not None else (100 if pairs else 0)
orders = core.ORDERS if args.order == "both" else core.ORDERS[:1]

# ------------------------------------------------------------------------------------------ data
HUB = {"vl_rewardbench": "MMInstruction/VL-RewardBench", "mm_rlhf": "yifanzhang114/MM-RLHF-RewardBench"}


def from_hub(bench):
    """Fetch a hub copy -> (file, image folder) in the local schema. Without a network this fails at once."""
    how = "download it where there is a network and pass --data FILE --images DIR"
    if bench not in HUB:
        raise SystemExit(f"{bench}: no hub copy; clone facebookresearch/multimodal_rewardbench, run its "
                         "scripts/0_download_data.py, then pass --data data/all_data.json --images data")
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
        if bench == "mm_rlhf":                 # a file + image folder, not a table (hub image paths unconfirmed)
            from huggingface_hub import snapshot_download
            root = Path(snapshot_download(HUB[bench], repo_type="dataset"))
            return root / "mm_reward_bench.jsonl", root / "images"
        import datasets
        ds = datasets.load_dataset(HUB[bench], split="test")
    except Exception as e:
        raise SystemExit(f"{bench}: cannot load {HUB[bench]} from the hub ({type(e).__name__}: {e}); {how}") from None
    dest = out / "hub" / bench                   # the hub's rows with image paths; image_<row index> as in R1's copy
    (dest / "img").mkdir(parents=True, exist_ok=True)
    with open(dest / "data.jsonl", "w") as f:
        for i, r in enumerate(ds):
            r["image"].convert("RGB").save(dest / f"img/image_{i}.png")
            f.write(json.dumps({k: r.get(k) for k in ("id", "query", "response", "human_ranking")}
                               | dict(image=f"img/image_{i}.png")) + "\n")
    return dest / "data.jsonl", dest


if args.rescore is None:
    if args.hub:
        data, images = from_hub(args.bench)
    elif args.data or pairs:
        data, images = Path(args.data or "runs/01_data/test_pairs.jsonl"), args.images
    else:
        raise SystemExit(f"--bench {args.bench} needs --data FILE [--images DIR], or --hub")
    items, skipped = core.read_benchmark(data, args.bench, images, strict=args.strict, video_frames=args.video_frames)
    items = items[:num_items or None]
    print(f"read {data}: {len(items)} items x {len(orders)} order(s); skipped {sum(skipped.values())}: {dict(skipped)}")


# ------------------------------------------------------------------------------------------ generation
def load_image(path):
    """An RGB image (or video frame), downscaled to at most --max-pixels."""
    from PIL import Image
    image = Image.open(path).convert("RGB")
    if image.width * image.height > args.max_pixels:
        s = math.sqrt(args.max_pixels / (image.width * image.height))
        image = image.resize((max(28, int(image.width * s)), max(28, int(image.height * s))))
    return image


def judge_all(model, processor, jobs, temperature):
    """jobs: list of job dicts (core.make_jobs). Returns the generated texts, in order. ALL model generation
    goes through here (transformers today; a vLLM engine would replace the core.sample call)."""
    texts = []
    for i in range(0, len(jobs), args.batch_size):
        msgs = []
        for job in jobs[i:i + args.batch_size]:
            it = by_key[job["key"]]
            a1, a2 = (it["chosen"], it["rejected"]) if job["order"] == "chosen_first" else (it["rejected"], it["chosen"])
            if "frames" in it:                  # a video: every frame gets the first frame's (downscaled) size
                frames = [load_image(f) for f in it["frames"]]
                frames = [f if f.size == frames[0].size else f.resize(frames[0].size) for f in frames]
                msgs.append(core.build_messages(it["question"], a1, a2, frames, kind="video"))
            else:
                msgs.append(core.build_messages(it["question"], a1, a2, load_image(it["image"])))
        if args.vllm:
            texts += model.sample(msgs, args.max_new_tokens, temperature)[1]
        else:
            texts += core.sample(model, processor, msgs, args.max_new_tokens, temperature, args.device)[1]
    return texts


engine = None


def evaluate(path, gen_file):
    """Generate (resuming from gen_file) and return the saved rows of this run's jobs."""
    import torch
    from tqdm import tqdm
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)                                 # Voting@K samples are reproducible (if not resumed)
    sig = dict(model=str(path), weights=max((f.stat().st_mtime for f in Path(path).glob("*")), default=None),
               data=str(Path(data).resolve()), max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels)
    videos = any("frames" in it for it in items)
    if videos:                                                   # (kept out otherwise: older runs still resume)
        sig["video_frames"] = args.video_frames
    meta = gen_file.with_suffix(".meta.json")                    # what the saved generations were made with
    if gen_file.exists() and meta.exists() and json.loads(meta.read_text()) != sig:
        raise SystemExit(f"{gen_file} holds generations made with other settings (see {meta}); pass --fresh")
    meta.write_text(json.dumps(sig))
    if args.vllm:                  # one engine for all --models (same architecture): later ones are synced in
        global engine
        if engine is None:
            engine = core.VLLMEngine.from_args(args, path, seed=args.seed)
        else:
            engine.sleep()
            engine.sync(core.load_policy(path)[0].named_parameters())
        model, processor = engine, None
    else:
        model, processor = core.load_policy(path, device=args.device)
        model.eval()
    rows = []
    for mode, k, its, temp in (("greedy", 1, items, 0.0), ("vote", args.vote_k, items[:vote_items or None], 1.0)):
        jobs = core.make_jobs(its, orders, mode, k) if k else []
        bar = tqdm(total=len(jobs), desc=f"{mode} T={temp}", leave=False)

        def generate(batch):
            texts = judge_all(model, processor, batch, temp)
            bar.update(len(batch))
            return texts
        rows += core.run_jobs(gen_file, jobs, generate, args.batch_size)
        bar.close()
    return rows


def score(rows):
    """The same arithmetic for a fresh run and for --rescore: greedy metrics, and Voting@K if sampled. The
    curve (paper Fig. 4) is the accuracy of Voting@k on the first k samples, for k in 1, 3, 5, 9, 15 up to K,
    beside greedy accuracy on the same (usually fewer) items, which is what voting should be compared with."""
    vote = core.predictions(rows, "vote")
    k = max((r["sample"] + 1 for r in rows if r["mode"] == "vote"), default=0)
    curve = {j: core.metrics(core.predictions([r for r in rows if r["mode"] == "vote" and r["sample"] < j], "vote"))["acc"]
             for j in sorted({1, 3, 5, 9, 15, k}) if 0 < j <= k}
    voted = {r["key"] for r in rows if r["mode"] == "vote"}
    same_items = [r for r in rows if r["mode"] == "greedy" and r["key"] in voted]
    return dict(greedy=core.metrics(core.predictions(rows, "greedy")), vote=core.metrics(vote) if vote else None, k=k,
                vote_curve=curve, greedy_on_vote_items=core.metrics(core.predictions(same_items))["acc"] if same_items else None)


# ------------------------------------------------------------------------------------------ run / rescore
results, t0 = {}, time.time()
if args.rescore:
    for f in args.rescore:
        rows = core.read_generations(f)
        bench = rows[0]["bench"] if rows else args.bench
        results[Path(f).stem.removeprefix(f"generations_{bench}_")] = score(rows) | dict(file=f)
    skipped = Counter()
else:
    by_key = {it["key"]: it for it in items}
    bench = args.bench
    for path in args.models:
        if not Path(path).exists() and (path.startswith(("runs", ".", "/")) or path.count("/") != 1):  # not a hub id
            raise SystemExit(f"checkpoint not found: {path} (run the earlier stages, or pass --models)")
        name = Path(path).parent.name if Path(path).name == "model" else Path(path).name
        gen_file = out / f"generations_{bench}_{name}.jsonl"
        if args.fresh:
            gen_file.unlink(missing_ok=True)
            gen_file.with_suffix(".meta.json").unlink(missing_ok=True)
        t = time.time()
        too_long = engine.too_long if engine else 0
        results[name] = score(evaluate(path, gen_file)) | dict(file=str(gen_file), seconds=round(time.time() - t, 1))
        if engine:                  # prompts that could not fit vLLM's max_model_len: empty output, a parse failure
            results[name]["too_long"] = engine.too_long - too_long
            print(f"{name}: {results[name]['too_long']} generations not sent to vLLM (prompt too long)")
        g = results[name]["greedy"]
        print(f"{name}: " + " | ".join(f"{k} {v:.3f}" for k, v in g.items() if isinstance(v, float)))

# ------------------------------------------------------------------------------------------ report
pct = lambda x, d=1: "-" if x is None else f"{100 * x:.{d}f}"
# the paper's Tables 3-5: (column, category name or metric key)
PAPER_COLS = dict(
    vl_rewardbench=[("General", "general"), ("Halluc.", "hallucination"), ("Reasoning", "reasoning"),
                    ("Overall", "acc"), ("Macro", "macro")],
    mm_rlhf=[("Mcq", "mcq"), ("Long", "long"), ("Short", "short"), ("Safety", "safety"), ("Video", "video"),
             ("Acc", "acc"), ("Acc+", "acc_plus")],
    mmrb=[("Overall", "acc"), ("Corr.", "correctness"), ("Pref.", "preference"), ("Know.", "knowledge"),
          ("Math", "math"), ("Coding", "coding"), ("Safety", "safety"), ("VQA", "vqa")])
lines = []
if bench in PAPER_COLS:
    cols = PAPER_COLS[bench]
    lines += ["| Model | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        for label, m in ((name, r["greedy"]), (f"{name} Voting@{r['k']}", r["vote"])):
            if m:
                lines.append(f"| {label} | " + " | ".join(pct(m[key] if key in m else m["category"].get(key), 2)
                                                          for _, key in cols) + " |")
    lines.append("")
k = max((r["k"] for r in results.values()), default=0) or "K"
both = any(r["greedy"]["acc_chosen_second"] is not None for r in results.values())
lines += [f"| model | acc (chosen first) | acc (chosen second) | **acc ({'both orders' if both else 'chosen first'})** | "
          f"both right | answered \"1\" | parse fail | Voting@{k} | Any@{k} |", "|---" * 9 + "|"]
for name, r in results.items():
    g, v = r["greedy"], r["vote"] or {}
    lines.append(f"| {name} | {pct(g['acc_chosen_first'])} | {pct(g['acc_chosen_second'])} | **{pct(g['acc'])}** | "
                 f"{pct(g['both_right'])} | {pct(g['answered_1'])} | {pct(g['parse_fail'])} | "
                 f"{pct(v.get('acc'))} | {pct(v.get('any'))} |")
cats = sorted({c for r in results.values() for c in r["greedy"]["category"]})
if bench not in PAPER_COLS and len(cats) > 1:          # e.g. easy-vqa's question types (01_build_data.py)
    lines += ["", "| model (greedy, by category) | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(pct(r["greedy"]["category"].get(c)) for c in cats) + " |"
              for name, r in results.items()]
first, note = next(iter(results.values()), None), ""
if first:
    g, v = first["greedy"], first["vote"]
    note = (f"\n\n{bench}: {g['n']} predictions (items x orders), greedy"
            + (f"; Voting@{k}: {v['n']} predictions at T=1.0" if v else "")
            + (f". Skipped rows: {dict(skipped)}" if skipped else "") + ".\n")
    note += "".join(f"\n{name} Voting@k: " + ", ".join(f"k={j} {pct(a)}" for j, a in r["vote_curve"].items())
                    + f"; greedy on the same items {pct(r.get('greedy_on_vote_items'))}\n"
                    for name, r in results.items() if r.get("vote_curve"))
table = "\n".join(lines)
(out / "eval.md").write_text(table + note)
(out / "eval.json").write_text(json.dumps(dict(args=vars(args), bench=bench, skipped=dict(skipped),
                                               results=results), indent=2))
print("\n" + table + note)
print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} ({time.time() - t0:.1f} s)")
