"""
Does a model's vision tower see easy-vqa shapes, and can it learn them? Two measurements on one checkpoint:
 1. the model's own greedy answer to the test pairs' shape questions, asked as plain VQA ("what shape is present?");
 2. its vision tower plus a linear head (mean of the merged image tokens -> 3 shapes), trained on the shape
    questions of the training VQA items alone (batches of 64 images, AdamW, constant LR), scored on the test
    pairs' shape images every 50 steps. --from-scratch starts the tower from random weights instead.
--save DIR writes the checkpoint with the trained tower (the head is dropped), for 02_sft.py --model DIR.

    python assets/shape_probe.py runs/i8/sft/model --data runs/01_data --steps 300
    python 02_sft.py --init-only --hidden 384 --layers 6 --vision-depth 4 --vision-hidden 256 --out runs/vw
    python assets/shape_probe.py runs/vw/init --steps 300 --save runs/vw/seeing    # then 02_sft.py --model runs/vw/seeing
"""
import argparse, json, random, sys, time
from pathlib import Path
import torch
from PIL import Image
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stable_reinforce_core as core

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("model")
p.add_argument("--data", default="runs/01_data")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--from-scratch", action="store_true")
p.add_argument("--save", default=None, help="write the model, with the trained tower, and its processor here")
args = p.parse_args()
torch.manual_seed(0)
SHAPES, root = ("circle", "rectangle", "triangle"), Path(args.data)
rows = lambda name: [json.loads(line) for line in open(root / name)]
test_q = [r for r in rows("test_pairs.jsonl") if r.get("category") == "shape"]
test = {r["image"]: SHAPES.index(r[f"response{r['label']}"]) for r in test_q}
train = {r["image"]: SHAPES.index(r["answer"]) for r in rows("train_vqa.jsonl")
         if r["question"].startswith("what shape") and r["answer"] in SHAPES}
image = lambda path: Image.open(root / path).convert("RGB")
model, processor = core.load_policy(args.model)
print(f"shape-labelled images: {len(train)} for training, {len(test)} for testing")


def vqa_accuracy(items, answer):
    """The share of items whose greedy answer is exactly answer(item)."""
    right = 0
    for i in range(0, len(items), 32):
        chunk = items[i:i + 32]
        _, texts = core.sample(model, processor, [core.vqa_messages(r["question"], image(r["image"])) for r in chunk], 8, 0)
        right += sum(t.strip() == answer(r) for r, t in zip(chunk, texts))
    return right / len(items)


model.eval()                                                                     # 1. the model's own answers
seen = random.Random(0).sample([r for r in rows("train_vqa.jsonl") if r["question"].startswith("what shape")], 160)
colour = random.Random(0).sample([r for r in rows("train_vqa.jsonl") if r["question"] == "what color is the shape?"], 160)
test_acc = vqa_accuracy(test_q, lambda r: r[f"response{r['label']}"])
seen_acc, colour_acc = vqa_accuracy(seen, lambda r: r["answer"]), vqa_accuracy(colour, lambda r: r["answer"])
print(f"greedy VQA: {test_acc:.3f} right on the {len(test_q)} test shape questions (chance 0.333); "
      f"on 160 training items {seen_acc:.3f} (shape) and {colour_acc:.3f} (colour)")

vision = model.model.visual                                                      # 2. the tower, trained on shapes
if args.from_scratch:
    vision = type(vision)._from_config(vision.config)
head = torch.nn.Linear(vision.config.out_hidden_size, 3)
opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)


def logits(paths):
    b = processor.image_processor(images=[image(q) for q in paths], return_tensors="pt")
    tokens = vision(b["pixel_values"], grid_thw=b["image_grid_thw"]).pooler_output
    return head(tokens.reshape(len(paths), -1, head.in_features).mean(1))


rng, keys, t0 = random.Random(0), sorted(train), time.time()
for step in range(1, args.steps + 1):
    vision.train()
    paths = rng.sample(keys, 64)
    loss = torch.nn.functional.cross_entropy(logits(paths), torch.tensor([train[q] for q in paths]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        vision.eval()
        with torch.no_grad():
            acc = (logits(sorted(test)).argmax(-1) == torch.tensor([test[q] for q in sorted(test)])).float().mean()
        print(f"step {step}: loss {loss.item():.3f}, test shape accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
if args.save:
    model.model.visual = vision
    model.save_pretrained(args.save)
    processor.save_pretrained(args.save)
    print(f"wrote {args.save}")
