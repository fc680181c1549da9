"""
Stage 2: cold-start SFT (R1-Reward section 4.2): teach the format and the task with teacher reasoning.

    python 02_sft.py                                        # tiny random Qwen2.5-VL, CPU-sized
    python 02_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --lr 1e-5 --see-first 0 --vqa-batch-size 0 --batch-size 8
    torchrun --nproc_per_node=4 02_sft.py --model ... (FSDP2; paper: 1 epoch, lr 1e-5, batch 256 on 4 GPUs)

Target: "<think>{teacher reasoning}</think><answer>{label}</answer>" after the Table 1 prompt, with the
loss on the assistant turn only. With --model tiny (the default) we build a small Qwen2.5-VL with random
weights and a byte-level BPE tokenizer trained on the prompts here, save both with save_pretrained, and
every later stage (and vLLM) loads that folder like any hub checkpoint. Because a from-scratch model
must first learn to see, the first --see-first steps train on plain VQA items only (image + question ->
one-word answer), and every later step mixes them in (--vqa-batch-size).

Reads runs/01_data; writes runs/02_sft/{init,model}/, metrics.jsonl, meta.json, and resume.pt (the latest
resumable checkpoint, every --save-every steps; `--resume` continues from it, Ctrl-C saves it and exits 0).
"""
import argparse, json, math, random, time
from pathlib import Path
import torch
from tqdm import tqdm
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="runs/01_data", help="output of 01_build_data.py")
p.add_argument("--out", default="runs/02_sft")
p.add_argument("--model", default="tiny", help="'tiny' or 'random-7b' (random init at the Qwen2.5-VL-7B shape, built "
               "here with the tiny tokenizer: for benchmarks without a download), a hub id or a local folder")
p.add_argument("--steps", type=int, default=450, help="optimizer steps")
p.add_argument("--micro-batch", type=int, default=0, help="items per forward/backward (0 = a rank's whole share "
               "of a source at once); memory only: the loss and the gradient are the same")
p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (decoder layers and vision blocks)")
p.add_argument("--init-only", action="store_true", help="build the random model in --out/init (tiny or random-7b), then stop")
p.add_argument("--batch-size", type=int, default=16, help="pair items per step")
p.add_argument("--lr", type=float, default=5e-4, help="peak LR (paper: 1e-5 for 7B)")
p.add_argument("--see-first", type=int, default=100, help="first steps train on VQA items only (learn to see, then judge)")
p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps for linear warmup, then cosine to 0")
p.add_argument("--vqa-batch-size", type=int, default=48, help="plain VQA items per step (short and cheap; they teach seeing)")
p.add_argument("--max-pixels", type=int, default=112 * 112, help="processor pixel limit (tiny model only; hub models keep theirs)")
p.add_argument("--hidden", type=int, default=192, help="tiny model: text hidden size")
p.add_argument("--layers", type=int, default=4, help="tiny model: text decoder layers")
p.add_argument("--vocab", type=int, default=1024, help="tiny model: BPE vocabulary size")
p.add_argument("--vision-depth", type=int, default=2, help="tiny model: ViT blocks")
p.add_argument("--vision-hidden", type=int, default=128, help="tiny model: ViT width (heads of 32)")
p.add_argument("--workers", type=int, default=0, help="background processes that build the batches (image processor "
               "and tokenizer run on the CPU), so that a GPU need not wait for them")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
core.add_reliability_flags(p, save_every=50)                     # --save-every --resume --strict ...
args = p.parse_args()
rank, world, args.device = core.init_distributed(args.device)     # torchrun: one process per GPU, else (0, 1)
main = rank == 0
assert args.batch_size % world == 0 and args.vqa_batch_size % world == 0, "batch sizes must divide by the GPU count"
random.seed(args.seed)
torch.manual_seed(args.seed)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# ------------------------------------------------------------------------------------------ data
data = Path(args.data)
skipped = core.Skipped(args.strict)
pairs = core.load_items(data / "train_pairs.jsonl", skipped=skipped)
vqa = core.load_items(data / "train_vqa.jsonl", fields=core.VQA_FIELDS, skipped=skipped) if (data / "train_vqa.jsonl").exists() else []


def example(item):
    """(chat turn, assistant target) for a pair item or a VQA item."""
    from PIL import Image
    if "label" in item:
        msgs, y = core.pair_view(item)
        return msgs, f"<think>{item.get('think', '')}</think><answer>{y}</answer>"
    return core.vqa_messages(item["question"], Image.open(item["image"]).convert("RGB")), item["answer"]


# ------------------------------------------------------------------------------------------ the tiny model
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's chat format: default system prompt, one <|vision_start|><|image_pad|><|vision_end|> per image and
# one <|vision_start|><|video_pad|><|vision_end|> per video (05's MM-RLHF video pairs; training never has videos).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny(path):
    """A from-scratch Qwen2.5-VL: byte-level BPE trained on our texts, random weights, saved as a checkpoint."""
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    texts = ["You are a helpful assistant. system user assistant"]
    for it in pairs[:5000]:
        texts += [core.PROMPT_TEMPLATE.format(question=it["question"], answer1=it["response1"], answer2=it["response2"]),
                  f"<think>{it.get('think', '')}</think><answer>{it['label']}</answer>"]
    texts += [f"{it['question']} {it['answer']}" for it in vqa[:5000]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL[1:], chat_template=CHAT_TEMPLATE)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=args.max_pixels),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = core.qwen25vl_config(ids, len(tok), args.model, args.hidden, args.layers, args.vision_depth, args.vision_hidden)
    if args.model == "random-7b":        # 8.29B parameters: built and saved in bf16 (16.6 GB), which any later stage loads
        torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device if args.model == "random-7b" else "cpu"):     # a GPU initialises 8B weights in seconds
        model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    print(f"built tiny Qwen2.5-VL at {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tok)}")
    return str(path)


ckpt = core.load_checkpoint(out / "resume.pt", args) if args.resume else None
model_path = (str(out / "init") if ckpt or not main else build_tiny(out / "init")) if args.model in ("tiny", "random-7b") else args.model
if world > 1:
    torch.distributed.barrier()                                   # rank 0 has built the tiny model by now
if args.init_only:
    print(f"--init-only: {model_path} is ready; train it here or pass it to any stage's --model")
    raise SystemExit(0)
model, processor = core.load_policy(model_path, device=args.device)
if args.grad_ckpt:
    model.gradient_checkpointing_enable({"use_reentrant": False})
if world > 1:                                   # FSDP2: fp32 master shards, bf16 compute on GPUs (STACK.md s10)
    core.fsdp2(model, bf16=args.device.startswith("cuda"))
print(f"rank {rank}/{world}: loaded {model_path} on {args.device}")
pairs = core.drop_long_prompts(pairs, processor, args.max_prompt_tokens, skipped)
vqa = core.drop_long_prompts(vqa, processor, args.max_prompt_tokens, skipped)
print(f"read {data}: {len(pairs)} pairs, {len(vqa)} VQA items; skipped {dict(skipped) or 'none'}")


def step_items(step):
    """The (pairs, VQA items) of one step: a pure function of (seed, step), so a resumed run sees the same data."""
    rng = random.Random(args.seed * 1_000_003 + step)
    n_pairs = 0 if (vqa and step <= args.see_first) else args.batch_size
    n_vqa = min(args.vqa_batch_size + args.batch_size - n_pairs, len(vqa))
    return rng.sample(pairs, n_pairs)[rank::world], rng.sample(vqa, n_vqa)[rank::world]   # this rank's share


# ------------------------------------------------------------------------------------------ train
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
sched = core.warmup_cosine(opt, args.steps, args.warmup)        # linear warm-up, then cosine to 0
start, bad_run, bad_steps, row = 0, 0, 0, {}
if ckpt:
    core.load_full_state(model, opt, ckpt["model"], ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    core.set_rng_state(ckpt["rng"][rank])
    start, bad_run, bad_steps = ckpt["step"], ckpt["bad_run"], ckpt["bad_steps"]


def save(step):
    """resume.pt (rank 0 writes; under FSDP2 the shards are gathered first, and every rank's RNG state kept)."""
    model_state, opt_state = core.full_state(model, opt)
    rng = core.all_gather(core.rng_state())
    if main:
        core.save_checkpoint(out / "resume.pt", model=model_state, opt=opt_state, sched=sched.state_dict(),
                             step=step, rng=rng, bad_run=bad_run, bad_steps=bad_steps, args=vars(args))


class Steps(torch.utils.data.Dataset):
    """Step i's items and its collated micro-batches (CPU tensors), each with its source's response-token count.
    Pairs and VQA items go in separate micro-batches: padding a 40-token VQA item to a 270-token pair wastes compute."""
    def __len__(self):
        return args.steps - start

    def __getitem__(self, i):
        pair_items, vqa_items = step_items(start + 1 + i)
        micro = []
        for items in (pair_items, vqa_items):
            size = args.micro_batch or len(items) or 1
            parts = [core.collate(processor, *map(list, zip(*map(example, items[j:j + size]))))
                     for j in range(0, len(items), size)]
            micro += [(batch, mask, sum(int(m.sum()) for _, m in parts)) for batch, mask in parts]
        return start + 1 + i, pair_items, vqa_items, micro


loader = torch.utils.data.DataLoader(Steps(), batch_size=None, collate_fn=lambda x: x, num_workers=args.workers,
                                     prefetch_factor=4 if args.workers else None)
log = core.open_log(out / "metrics.jsonl", start if ckpt else None) if main else None
stop = core.StopOnSigint()
model.train()
t0, tokens = time.time(), 0
for step, pair_items, vqa_items, collated in (bar := tqdm(loader, desc="sft", initial=start, total=args.steps, disable=not main)):
    loss = 0.0
    for batch, resp_mask, n_resp in collated:  # loss = sum over the two sources of their mean token NLL, so the
        batch, resp_mask = {k: v.to(args.device) for k, v in batch.items()}, resp_mask.to(args.device)  # short
        part = -core.response_logprobs(model, batch, resp_mask).sum() / n_resp            # VQA answers weigh as
        if step in args.inject_nan_at:                                                     # much as the pairs
            part = part * float("nan")
        part.backward()
        loss += part.item()
        tokens += int(batch["attention_mask"].sum())
    loss = core.all_reduce_(torch.tensor([loss]), "sum").item() / world   # the mean over ranks, for the log
    gnorm, ok = core.guarded_step(model, opt, math.isfinite(loss))   # a non-finite step changes nothing ...
    sched.step()                                                      # ... but still uses its data and LR slot
    bad_run, bad_steps = (0 if ok else bad_run + 1), bad_steps + (not ok)
    row = dict(step=step, loss=round(loss, 4), grad_norm=round(gnorm, 3), lr=sched.get_last_lr()[0],
               tokens_per_s=round(tokens / (time.time() - t0), 1), skipped_step=not ok,
               pair_ids=[i for r in core.all_gather([it["id"] for it in pair_items]) for i in r],
               vqa_ids=[i for r in core.all_gather([it["id"] for it in vqa_items]) for i in r])
    stop.requested = bool(core.all_reduce_(torch.tensor([float(stop.requested)]), "max"))   # all ranks stop together
    if main:
        log.write(json.dumps(row) + "\n")
        log.flush()
    bar.set_postfix(loss=f"{row['loss']:.3f}")
    if not ok:
        print(f"step {step}: non-finite loss {loss} or grad norm {gnorm}: skipped ({bad_run} in a row)")
    if bad_run >= args.max_bad_steps or stop.requested or (args.save_every and step % args.save_every == 0):
        save(step)
    if bad_run >= args.max_bad_steps:
        raise SystemExit(f"stopping at step {step}: {bad_run} non-finite steps in a row (--max-bad-steps). {out / 'resume.pt'} "
                         f"holds the last good weights; find the cause, then continue with --resume.")
    if stop.requested:
        print(f"interrupted: saved {out / 'resume.pt'} at step {step}/{args.steps}; continue with --resume")
        raise SystemExit(0)
    if main and (step % 50 == 0 or step == args.steps):
        print(f"step {step:5d}/{args.steps} | loss {row['loss']:.4f} | grad {row['grad_norm']:.2f} | "
              f"lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s")

final_state, _ = core.full_state(model)                  # under FSDP2: gathered to rank 0
if main:
    plain = model if world == 1 else core.load_policy(model_path)[0]   # an unsharded copy to save from
    plain.load_state_dict(final_state)
    plain.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    meta = dict(stage="02_sft", args=vars(args), world_size=world, init=str(model_path), seconds=round(time.time() - t0, 1),
                final_loss=row.get("loss"), params=sum(p.numel() for p in plain.parameters()),
                skipped_items=skipped, skipped_steps=bad_steps)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out / 'model'}, {out / 'metrics.jsonl'}, {out / 'meta.json'} ({meta['seconds']} s)")
if world > 1:
    torch.distributed.destroy_process_group()
