"""
Stage 4: StableReinforce (R1-Reward section 4.1, Algorithm 1) on the hard items from stage 3.

    python 04_stable_reinforce.py                                  # StableReinforce, tiny defaults
    python 04_stable_reinforce.py --no-pre-clip --no-adv-filter    # plain Reinforce++ (the ablation baseline)
    python 04_stable_reinforce.py --judge-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node=8 04_stable_reinforce.py --vllm --grad-ckpt ...   # FSDP2, one vLLM engine per GPU

StableReinforce = Reinforce++ (one sample per prompt, no critic, A_t = return-to-go, global batch
normalisation, PPO-clipped surrogate) plus three changes. Grep for the tags:
  [SR-1] Pre-CLIP: clamp the log-ratio to [ln 1e-3, ln 1e3] BEFORE exp   -> core.stable_policy_loss
  [SR-2] Advantage filter: zero every standardised advantage with |z| > 3 -> core.standardize_and_filter
  [SR-3] Consistency reward: R = Result * (1 + 0.5 * Consistency) + 0.5 * Format, where a judge says
         whether the reasoning's conclusion agrees with the answer      -> core.score_rollouts
Deliberate differences from the official code (yfzhang114/r1_reward, see README):
  - the filter keeps |z| <= 3 around 0, not around the raw mean reward (B1);
  - the trainer's log-probs see the image, exactly as the sampler did (B2);
  - Consistency is in {0, 1} and is asked only for correct answers (B3); unparseable answers earn nothing (B4);
  - paper hyper-parameters by default (KL coefficient 0), the official script's as flags (B7).
One step: sample --rollout-batch responses (T = 1) -> rewards -> returns -> standardise + filter ->
recompute old log-probs -> --rollout-batch / --train-batch optimizer steps of the clipped surrogate.

Reads runs/03_hard/rl_pairs.jsonl and runs/02_sft/model; writes runs/04_rl/{model/, metrics.jsonl, meta.json} and
resume.pt (every --save-every steps; `--resume` continues from it, Ctrl-C saves it and exits 0).
"""
import argparse, contextlib, copy, json, math, os, random, time
from pathlib import Path
import torch
import stable_reinforce_core as core

# ------------------------------------------------------------------------------------------ config
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="runs/03_hard/rl_pairs.jsonl", help="RL set from 03_mine_hard.py")
p.add_argument("--model", default="runs/02_sft/model", help="start from the cold-start SFT checkpoint (paper)")
p.add_argument("--out", default="runs/04_rl")
p.add_argument("--steps", type=int, default=20, help="rollout steps (paper: ~350)")
p.add_argument("--rollout-batch", type=int, default=32, help="samples per rollout, 1 per prompt (paper: 256)")
p.add_argument("--both-orders", action="store_true", help="show each item in both response orders (2 samples per "
               "item, --rollout-batch / 2 items per step): a position preference scores no better than a coin. "
               "Not in the paper")
p.add_argument("--train-batch", type=int, default=16, help="sequences per optimizer step (paper: 128)")
p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward (memory only)")
p.add_argument("--lr", type=float, default=2e-5, help="peak AdamW LR (paper: 1e-6 for 7B; official script 3e-7)")
p.add_argument("--warmup", type=float, default=0.03, help="fraction of optimizer steps of linear LR warm-up, then cosine "
               "down to --min-lr-ratio x --lr (the official script's schedule; the paper states only the peak)")
p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the final LR as a fraction of --lr (official script: 0.1)")
p.add_argument("--beta", type=float, default=0.0, help="KL coefficient in the reward, k1 (paper: 0; official script 1e-3)")
p.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip epsilon")
p.add_argument("--no-pre-clip", action="store_true", help="ablation: drop Pre-CLIP [SR-1]")
p.add_argument("--no-adv-filter", action="store_true", help="ablation: drop the 3-sigma filter [SR-2]")
p.add_argument("--judge", default="rule", choices=["rule", "api"], help="consistency judge [SR-3]; 'rule' is offline")
p.add_argument("--judge-url", default=None, help="OpenAI-compatible referee, e.g. http://host:8000/v1 (implies --judge api)")
p.add_argument("--judge-model", default=None, help="the referee's name there (paper: Qwen2.5-VL-7B-Instruct)")
p.add_argument("--judge-timeout", type=float, default=30.0, help="seconds per judge request")
p.add_argument("--judge-retries", type=int, default=2, help="retries per verdict (timeouts, connection errors, 5xx)")
p.add_argument("--judge-concurrency", type=int, default=64, help="judge requests in flight")
p.add_argument("--judge-image", action="store_true", help="also show the referee the image")
p.add_argument("--judge-choice", action="store_true", help="ask a vLLM referee to constrain its reply to yes|no "
               "(structured outputs; other servers may reject the field)")
p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (the trainer divides logits by it)")
p.add_argument("--max-new-tokens", type=int, default=96, help="paper: 1024")
core.add_vllm_flags(p, gpu_memory_utilization=0.3)     # --vllm (colocated engine) --gpu-memory-utilization ...
p.add_argument("--max-model-len", type=int, default=4096, help="vLLM: prompt + response token budget")
p.add_argument("--fp32", action="store_true", help="train in full fp32 on GPU (default: bf16 autocast; fp32 master weights either way)")
p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (decoder layers and vision blocks)")
p.add_argument("--benchmark", action="store_true", help="measure, do not keep: before each rollout, time a plain vLLM "
               "generate of the same requests (the baseline of rollout tok/s), and save no checkpoint and no model")
p.add_argument("--profile-step", type=int, default=0, help="torch-profile this step's old-log-prob pass and the first "
               "optimizer step of its update (rank 0): profile_step<N>_{old_logp,train}.txt in --out, each headed by "
               "the GPU's busy share, then ops by GPU time and by CPU time")
p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU (default on H100/H200: 989, bf16 dense; 67, fp32, with --fp32)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
core.add_reliability_flags(p, save_every=5)                     # --save-every --resume --strict ...
args = p.parse_args()
args.judge = "api" if args.judge_url else args.judge
if args.judge == "api" and not (args.judge_url and args.judge_model):
    p.error("--judge api needs --judge-url and --judge-model")
rank, world, args.device = core.init_distributed(args.device)     # torchrun: one process per GPU, else (0, 1)
main = rank == 0
assert args.rollout_batch % args.train_batch == 0 and args.train_batch % (world * args.micro_batch) == 0, \
    "batch sizes must divide: rollout-batch by train-batch, train-batch by (GPUs x micro-batch)"
views_per_item = 2 if args.both_orders else 1
assert args.rollout_batch % (views_per_item * world) == 0, "--both-orders: rollout-batch must divide by 2 x GPUs"
random.seed(args.seed)
torch.manual_seed(args.seed + rank)                                 # each rank samples its own rollouts
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
log_print = print if main else (lambda *a, **k: None)

# ------------------------------------------------------------------------------------------ data, model, judge
bad_rows = core.Skipped(args.strict)
items = core.load_items(args.data, skipped=bad_rows)
engine = None
if args.vllm:            # the engine first: its memory budget is a share of the whole GPU (STACK.md s1)
    engine = core.VLLMEngine.from_args(args, args.model, args.seed + rank, args.max_model_len)
    engine.sleep()
    log_print(f"vLLM engine started in {engine.timings['start_s']:.1f} s; torch's allocator counts its "
              f"{engine.torch_counted_bytes / 2**30:.1f} GiB pool, which the trainer's peaks below leave out")
model, processor = core.load_policy(args.model, device=args.device)
items = core.drop_long_prompts(items, processor, args.max_prompt_tokens, bad_rows)
if not items:
    raise SystemExit(f"{args.data} has no usable items (skipped: {dict(bad_rows)}); did stage 3 keep any? (try --min-difficulty 1 there)")
bf16 = args.device.startswith("cuda") and not args.fp32     # the trainer's compute; vLLM samples in bf16 either way
amp = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()
banned = core.vision_token_ids(processor)
ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None   # only for the KL term
if args.grad_ckpt:
    model.gradient_checkpointing_enable({"use_reentrant": False})
if world > 1:                  # FSDP2: fp32 master shards, bf16 compute on GPUs unless --fp32 (STACK.md s10)
    for m_ in filter(None, (model, ref_model)):
        core.fsdp2(m_, bf16=bf16)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,   # fused: no
                        fused=args.device.startswith("cuda"))        # parameter-sized temporaries (foreach makes ~2)
sched = core.warmup_cosine(opt, args.steps * (args.rollout_batch // args.train_batch), args.warmup, args.min_lr_ratio)
judge = core.RuleJudge() if args.judge == "rule" else core.APIJudge(core.ChatClient(
    args.judge_url, args.judge_model, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=args.judge_timeout,
    retries=args.judge_retries, concurrency=args.judge_concurrency, max_tokens=8,
    extra_body={"structured_outputs": {"choice": ["yes", "no"]}} if args.judge_choice else None), with_image=args.judge_image)
log_print(f"{world} process(es); read {args.data} ({len(items)} items; skipped {dict(bad_rows) or 'none'}), {args.model}; pre_clip={not args.no_pre_clip} "
      f"adv_filter={not args.no_adv_filter} beta={args.beta}" + (" both_orders" if args.both_orders else ""))


def prompts(step):
    """The step's items (--rollout-batch, halved with --both-orders) from a fresh random permutation each epoch (no
    curriculum, as in the paper)."""
    per_epoch, n = len(items), args.rollout_batch // views_per_item
    order = []
    for k in range(step * n, (step + 1) * n):
        epoch, pos = divmod(k, per_epoch)
        perm = random.Random(args.seed * 1000 + epoch).sample(range(per_epoch), per_epoch)
        order.append(items[perm[pos]])
    return order


def pad_cat(tensors, value=0.0):
    """Concatenate [b, R_i] tensors into [sum b, max R_i], right-padded."""
    R = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, R - t.shape[1]), value=value) for t in tensors])


# ------------------------------------------------------------------------------------------ one StableReinforce step
cuda = args.device.startswith("cuda")
n_params = sum(p.numel() for p in model.parameters())          # the full count, also under FSDP2
hopper = cuda and any(g in torch.cuda.get_device_name() for g in ("H100", "H200"))     # SXM dense peaks, TFLOP/s:
peak = args.peak_tflops or ((67.0 if args.fp32 else 989.0) if hopper else None)       # fp32 (no TF32) 67, bf16 989


def device_used():
    """GiB in use on this GPU by every allocator (torch's cache, vLLM's pool, contexts), as the driver sees it."""
    return (lambda free, total: (total - free) / 2**30)(*torch.cuda.mem_get_info()) if cuda else 0.0


def gib_peak():
    """The trainer's peak memory since the last call, GiB: torch's allocator peak, less the vLLM pool it also
    counts (even while the engine sleeps; core.VLLMEngine.torch_counted_bytes)."""
    if not cuda:
        return 0.0
    gib = (torch.cuda.max_memory_allocated() - (engine.torch_counted_bytes if engine else 0)) / 2**30
    torch.cuda.reset_peak_memory_stats()
    return gib


def write_profile(prof, wall, path):
    """The profiled ops, headed by the GPU's busy share (core.gpu_busy_seconds)."""
    if cuda:
        torch.cuda.synchronize()
    prof.stop()
    busy, ops = core.gpu_busy_seconds(prof), prof.key_averages()   # ops by GPU time, then by CPU time (host-side
    path.write_text(f"{wall:.2f} s wall; GPU busy {busy:.2f} s ({100 * busy / wall:.0f}%)\n" +    # batching, syncs)
                    (ops.table(sort_by="self_device_time_total", row_limit=40) if cuda else "") +
                    ops.table(sort_by="cpu_time_total", row_limit=25))


def rl_step(step):
    t0, mem = time.time(), {}
    gib_peak()
    views = core.rollout_views(prompts(step)[rank::world], args.both_orders)   # this rank's share of the batch
    batch_items, msgs, labels = [v[0] for v in views], [v[1] for v in views], [v[2] for v in views]

    # 1. rollouts: one sample per prompt at T = 1.0, top-p 1 (paper Algorithm 1)
    model.eval()
    ids, texts, vllm_logp, plain = [], [], None, (0, 0.0)
    if engine:                  # wake, sync this step's weights (bf16), generate, sleep again for training
        engine.sync(model.named_parameters())
        if args.benchmark:      # the same requests, bare: the yardstick of this step's rollout speed
            plain = engine.plain_generate(msgs, args.max_new_tokens, args.temperature)
        t_gen = time.time()
        ids, texts, vllm_logp, _ = engine.sample(msgs, args.max_new_tokens, args.temperature)
        t_gen = time.time() - t_gen
        mem["device_rollout_gib"] = device_used()        # trainer + awake engine (weights, KV cache), from the driver
        engine.sleep()
    else:
        for i in range(0, len(msgs), args.micro_batch):
            ids_i, texts_i = core.sample(model, processor, msgs[i:i + args.micro_batch], args.max_new_tokens,
                                         args.temperature, args.device)
            ids, texts = ids + ids_i, texts + texts_i
        t_gen = time.time() - t0
    t_rollout = time.time() - t0
    mem["rollout_peak_gib"] = gib_peak()

    # 2. rewards [SR-3]: format, result, and consistency from the judge (asked only where the answer is right)
    t_judge = time.time()
    sc = core.score_rollouts(texts, labels, [it["question"] for it in batch_items], judge,
                             [it["image"] for it in batch_items])
    t_judge = time.time() - t_judge
    rewards = torch.tensor(sc["reward"], dtype=torch.float32)

    # 3. old (and reference) log-probs, recomputed by the trainer WITH the image [fix B2]
    chunks, t_old = [], time.time()
    prof = torch.profiler.profile() if step + 1 == args.profile_step and main else None
    if prof:
        prof.start()
    with torch.no_grad(), amp:
        for i in range(0, len(msgs), args.micro_batch):
            with torch.profiler.record_function("collate"):
                batch, mask = core.collate(processor, msgs[i:i + args.micro_batch], ids[i:i + args.micro_batch],
                                           args.device)
            old = core.response_logprobs(model, batch, mask, banned, args.temperature)
            ref = core.response_logprobs(ref_model, batch, mask, banned, args.temperature) if ref_model else None
            chunks.append(dict(batch=batch, mask=mask, old=old, kl=core.kl_k1(old, ref) if ref is not None else None))
    t_old = time.time() - t_old
    if prof:
        write_profile(prof, t_old, out / f"profile_step{step + 1}_old_logp.txt")
    # sampler vs trainer: |log pi_vLLM(a_t) - log pi_trainer(a_t)| over sampled tokens (should be ~0.01, bf16 noise)
    delta = torch.cat([(c["old"][r, :len(lp)].float().cpu() - torch.tensor(lp)).abs() for j, c in enumerate(chunks)
                       for r, lp in enumerate(vllm_logp[j * args.micro_batch:(j + 1) * args.micro_batch])]) \
        if vllm_logp else torch.zeros(1)

    # 4. Reinforce++ returns (reward on the last token, -beta * KL on every token), then [SR-2]
    mask = pad_cat([c["mask"] for c in chunks]).float().cpu()
    kl = pad_cat([c["kl"] for c in chunks]).cpu() if ref_model else None
    returns = core.reinforce_returns(rewards, mask, kl, args.beta)
    adv, filtered = core.standardize_and_filter(returns, mask, enabled=not args.no_adv_filter,
                                                all_reduce=core.all_reduce_)      # statistics over all ranks
    for j, c in enumerate(chunks):
        rows = slice(j * args.micro_batch, j * args.micro_batch + c["mask"].shape[0])
        c["adv"] = adv[rows, :c["mask"].shape[1]].to(args.device)

    # 5. policy update: --rollout-batch / --train-batch optimizer steps, pre-clipped PPO surrogate [SR-1]
    mem["old_logp_peak_gib"] = gib_peak()
    model.train()
    t_train, train_tokens = time.time(), sum(int(c["batch"]["attention_mask"].sum()) for c in chunks)
    per_step = args.train_batch // (world * args.micro_batch)         # micro-batches per optimizer step, per rank
    prof = torch.profiler.profile() if step + 1 == args.profile_step and main else None
    if prof:
        prof.start()
        t_prof = time.time()
    losses, stats, gnorms, skipped = [], [], [], 0
    for s in range(0, len(chunks), per_step):
        for c in chunks[s:s + per_step]:
            with amp:
                logp = core.response_logprobs(model, c["batch"], c["mask"], banned, args.temperature)
            loss, st = core.stable_policy_loss(logp, c["old"], c["adv"], c["mask"], args.eps_clip,
                                               pre_clip=not args.no_pre_clip)
            if step + 1 in args.inject_nan_at:
                loss = loss * float("nan")
            (loss / per_step).backward()
            losses.append(loss.item())
            stats.append(st)
        gnorm, ok = core.guarded_step(model, opt, all(map(math.isfinite, losses[-per_step:])))  # never let one
        health["run"] = 0 if ok else health["run"] + 1                                         # non-finite step
        health["skipped"] += not ok                                                            # poison the weights
        health["stop"] |= health["run"] >= args.max_bad_steps
        sched.step()                                       # a skipped step still uses its LR slot, as in stage 2
        skipped += not ok
        gnorms.append(gnorm)
        if prof:                                     # one optimizer step is enough, and keeps the event count low
            write_profile(prof, time.time() - t_prof, out / f"profile_step{step + 1}_train.txt")
            prof = None
    t_train = time.time() - t_train
    mem.update(train_peak_gib=gib_peak(), device_train_gib=device_used())   # torch's cache still holds the training peak
    train_tok_s = train_tokens * world / t_train                        # all ranks; MFU = 6 N tokens / (time * peak)

    n = len(texts)
    correct = [i for i in range(n) if sc["result"][i]]
    return dict(step=step + 1, reward=rewards.mean().item(), accuracy=len(correct) / n,
                format_rate=sum(sc["format"]) / n,
                # the share of parsed answers that pick "1": far from 0.5, the policy is learning a position shortcut
                answered_1=sum(c == 1 for c in sc["choice"]) / max(1, sum(c is not None for c in sc["choice"])),
                consistency_rate=sum(sc["consistency"][i] for i in correct) / max(1, len(correct)),
                filtered_frac=filtered, preclip_frac=sum(s["preclip_frac"] for s in stats) / len(stats),
                clip_frac=sum(s["clip_frac"] for s in stats) / len(stats),
                max_token_loss=max(s["max_token_loss"] for s in stats),
                policy_loss=sum(losses) / len(losses), max_policy_loss=max(abs(x) for x in losses),
                kl=(core.masked_mean(kl, mask).item() if kl is not None else 0.0),
                grad_norm=max(gnorms), skipped_steps=skipped, lr=sched.get_last_lr()[0],
                response_len=mask.sum(-1).mean().item(), rollout_s=t_rollout, old_logp_s=t_old, seconds=time.time() - t0,
                rollout_tok_s=mask.sum().item() / t_gen, plain_vllm_tok_s=plain[0] / max(plain[1], 1e-9),
                rollout_phase_tok_s=mask.sum().item() / t_rollout, train_tok_s=train_tok_s, train_s=t_train,
                mfu=6 * n_params * train_tok_s / (world * peak * 1e12) if peak else 0.0, **mem,
                logp_delta_mean=delta.mean().item(),
                logp_delta_max=delta.max().item(), **(engine.timings if engine else {}),
                judge_asked=sc["judge_asked"], judge_failed=sc["judge_failed"], judge_s=t_judge,
                logp=sum(c["old"].sum().item() for c in chunks) / mask.sum().item(),   # mean log-prob of the samples
                ids=[it["id"] for it in batch_items])


# ------------------------------------------------------------------------------------------ main loop
def judge_note(m):
    """The API judge's part of the step line: verdicts back / asked, its seconds, and a warning if none came back."""
    if args.judge == "rule":
        return ""
    down = m["judge_asked"] and m["judge_failed"] == m["judge_asked"]
    return (f" | judge {m['judge_asked'] - m['judge_failed']}/{m['judge_asked']} {m['judge_s']:.1f}s"
            + (" | JUDGE DOWN: no verdict this step, consistency 0" if down else ""))


def merge(rows):
    """One metrics row from every rank's: the mean of each number (the max of maxima, the sum of judge counts),
    the ranks' item ids together, and whether all ranks ran the same step."""
    m = dict(rows[0], ids=[i for r in rows for i in r["ids"]], ranks_in_step=len({r["step"] for r in rows}) == 1)
    for k, v in rows[0].items():
        if k.startswith("judge_"):
            m[k] = sum(r[k] for r in rows)
        elif isinstance(v, float):
            m[k] = (max if "max" in k or "gib" in k or k == "grad_norm" else lambda xs: sum(xs) / len(xs))([r[k] for r in rows])
    return m


def save_resume(step):
    """resume.pt (rank 0 writes; under FSDP2 the shards are gathered first, and every rank's RNG state kept)."""
    model_state, opt_state = core.full_state(model, opt)
    rng = core.all_gather(core.rng_state())
    if main:
        core.save_checkpoint(out / "resume.pt", model=model_state, opt=opt_state, sched=sched.state_dict(), step=step,
                             rng=rng, health=health, args=vars(args))


health = dict(run=0, skipped=0, stop=False)      # non-finite optimizer steps: in a row, in total, K reached
ckpt = core.load_checkpoint(out / "resume.pt", args) if args.resume else None
if ckpt:
    core.load_full_state(model, opt, ckpt["model"], ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    core.set_rng_state(ckpt["rng"][rank])
    health = dict(ckpt["health"], stop=False)
log = core.open_log(out / "metrics.jsonl", ckpt["step"] if ckpt else None) if main else None
stop = core.StopOnSigint()
t_start, m = time.time(), {}
for step in range(ckpt["step"] if ckpt else 0, args.steps):
    m = merge(core.all_gather(rl_step(step)))
    stop.requested = bool(core.all_reduce_(torch.tensor([float(stop.requested)]), "max"))   # all ranks stop together
    if main:
        log.write(json.dumps(m) + "\n")
        log.flush()
    log_print(f"step {m['step']:4d}/{args.steps} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | "
          f"fmt {m['format_rate']:.2f} | ans1 {m['answered_1']:.2f} | cons {m['consistency_rate']:.2f} | "
          f"filt {m['filtered_frac']:.3f} | "
          f"preclip {m['preclip_frac']:.4f} | clip {m['clip_frac']:.3f} | loss {m['policy_loss']:+.4f} | "
          f"kl {m['kl']:.4f} | len {m['response_len']:.1f} | {m['seconds']:.1f}s | roll {m['rollout_tok_s']:.0f} tok/s | "
          f"train {m['train_tok_s']:.0f} tok/s" + (f" MFU {100 * m['mfu']:.1f}% | GiB trainer peak roll/train "
          f"{m['rollout_peak_gib']:.1f}/{m['train_peak_gib']:.1f}, GPU {m['device_rollout_gib']:.1f}/"
          f"{m['device_train_gib']:.1f}" if peak else "")
          + (f" | plain vLLM {m['plain_vllm_tok_s']:.0f} tok/s" if args.benchmark and engine else "")
          + (f" | dlogp {m['logp_delta_mean']:.4f}/{m['logp_delta_max']:.3f} | sync {m['sync_s']:.2f}s "
             f"wake {m['wake_s']:.2f}s sleep {m['sleep_s']:.2f}s" if engine else "") + judge_note(m)
          + (f" | {world} ranks in step: {m['ranks_in_step']}" if world > 1 else ""), flush=True)
    if not args.benchmark and (health["stop"] or stop.requested or (args.save_every and (step + 1) % args.save_every == 0)):
        save_resume(step + 1)
    if health["stop"]:
        raise SystemExit(f"stopping at step {step + 1}: {health['run']} non-finite optimizer steps in a row "
                         f"(--max-bad-steps). {out / 'resume.pt'} holds the last good weights.")
    if stop.requested:
        log_print(f"interrupted at step {step + 1}/{args.steps} (--benchmark: nothing saved)" if args.benchmark else
                  f"interrupted: saved {out / 'resume.pt'} at step {step + 1}/{args.steps}; continue with --resume")
        raise SystemExit(0)

final_state, _ = core.full_state(model) if not args.benchmark else (None, None)   # FSDP2: gathered to rank 0
if main and not args.benchmark:
    plain = model if world == 1 else core.load_policy(args.model)[0]   # an unsharded copy to save from
    plain.load_state_dict(final_state)
    plain.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    meta = dict(stage="04_stable_reinforce", args=vars(args), world_size=world, seconds=round(time.time() - t_start, 1),
                rl_items=len(items), final=m, skipped_items=bad_rows, skipped_steps=health["skipped"],
                judge_stats=getattr(getattr(judge, "client", None), "stats", None))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out / 'model'}, {out / 'metrics.jsonl'}, {out / 'meta.json'} ({meta['seconds']} s)")
if world > 1:
    torch.distributed.destroy_process_group()
