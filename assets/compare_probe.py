"""
Can a decoder of the tiny judge's text size learn the template teacher's two reasoning steps when it need not see?
The image's colour and shape go into the prompt as text ("Image: red circle."), so only reasoning is left:
  answer   "The correct answer is X."               X from the question and the described image;
  compare  "Response N says Y, which is right|wrong" right iff Y == X.
A fresh Qwen2 decoder (the tiny judge's text stack: 384 wide, 6 layers, 8 heads, 4 KV heads) trains on the pair
file's teacher text (batches of 32, AdamW, constant LR; --cosine: 02_sft.py's schedule). Every 100 steps it
reports, on 600 held-out pairs and with the teacher's text as input, how often its argmax is the teacher's X and the
teacher's right/wrong, by question type.

    python assets/compare_probe.py runs/01_bal/train_pairs.jsonl --tokenizer runs/vw/seeing --steps 2000
"""
import argparse, json, random, re, sys, time
from collections import Counter
from pathlib import Path
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stable_reinforce_core as core

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("pairs", help="a pair file from 01_build_data.py (train_pairs.jsonl)")
p.add_argument("--tokenizer", default="runs/vw/seeing", help="any tiny-model folder (02_sft.py --init-only builds one)")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--cosine", action="store_true", help="02_sft.py's schedule (5%% warm-up, cosine to 0) instead of constant")
args = p.parse_args()
random.seed(args.seed)
torch.manual_seed(args.seed)
tok = AutoTokenizer.from_pretrained(args.tokenizer)
VERDICT = {tok.convert_tokens_to_ids(t) for t in tok.tokenize(" right wrong")}


def example(row):
    """(prompt ids, target ids, {target position: 'answer' | 'compare'}, question type)."""
    seen = re.match(r"The image shows an? ([^.]*)\. ", row["think"])
    prompt = (f"Image: {seen.group(1) if seen else 'unknown'}. Question: {row['question']}\n"
              f"Response 1: {row['response1']}\nResponse 2: {row['response2']}\n")
    target = tok(row["think"][seen.end() if seen else 0:])["input_ids"]
    probes = {i: "compare" for i, t in enumerate(target) if t in VERDICT}
    if tok.decode(target[:4]) == "The correct answer is":
        probes[4] = "answer"
    return tok(prompt)["input_ids"], target, probes, row["category"]


def batch(items):
    """Right-padded ids, attention mask, and labels on the target tokens only."""
    L = max(len(a) + len(b) for a, b, _, _ in items)
    ids, lab = torch.full((len(items), L), tok.pad_token_id), torch.full((len(items), L), -100)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for i, (a, b, _, _) in enumerate(items):
        ids[i, :len(a) + len(b)], mask[i, :len(a) + len(b)] = torch.tensor(a + b), 1
        lab[i, len(a):len(a) + len(b)] = torch.tensor(b)
    return ids, mask, lab


@torch.no_grad()
def score(items):
    """Teacher-forced argmax accuracy at the probed positions, per (step, question type)."""
    model.eval()
    hit, n = Counter(), Counter()
    for j in range(0, len(items), 100):
        part = items[j:j + 100]
        ids, mask, _ = batch(part)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, (a, b, probes, kind) in enumerate(part):
            for pos, what in probes.items():
                hit[what, kind] += int(logits[i, len(a) + pos - 1].argmax() == b[pos])
                n[what, kind] += 1
    model.train()
    return {k: round(100 * hit[k] / n[k], 1) for k in sorted(n)}


rows = [json.loads(line) for line in open(args.pairs)]
random.shuffle(rows)
test, train = [example(r) for r in rows[:600]], [example(r) for r in rows[600:]]
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
sched = core.warmup_cosine(opt, args.steps, 0.05) if args.cosine else None
t0 = time.time()
for step in range(1, args.steps + 1):
    ids, mask, lab = batch(random.sample(train, 32))
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    if sched:
        sched.step()
    if step % 100 == 0:
        acc = score(test)
        print(f"step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.0f} s")
        for what in ("answer", "compare"):
            print(f"  {what:8s} " + " | ".join(f"{k[1]} {v:5.1f}" for k, v in acc.items() if k[0] == what))
