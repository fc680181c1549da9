"""
The 1-GPU profile behind the README's MFU analysis (section "Several GPUs"): the policy-update micro-batch of
04_stable_reinforce.py at the Qwen2.5-VL-7B shape, i.e. FSDP2 (world size 1: the same fp32 master shards, bf16
all-gathers and fp32 gradient reduce as under torchrun), gradient checkpointing, bf16 autocast,
core.response_logprobs + core.stable_policy_loss, forward + backward only. The optimizer is left out: its fp32
state (66 GB) would not fit beside the weights and gradients on one GPU. Each micro-batch holds pairs from
01_build_data.py --image-size 448 (256 image tokens) with 1,024 response tokens of ordinary ids, as 04 sees them
at --max-new-tokens 1024 with random weights.

    python 01_build_data.py --out runs/d448 --image-size 448 --train-pairs 200 --test-pairs 10
    python 02_sft.py --model random-7b --init-only --data runs/d448 --out runs/r7b --max-pixels 200704
    python assets/prof_7b.py runs/r7b/init runs/d448/train_pairs.jsonl [variant,variant,...]

Per variant, one JSON line: seconds and tokens/s per micro-batch (mean of 3 after a warm-up), MFU = 6 N tokens /
(s x 989 TFLOP/s), the allocator peak; variants marked for profiling also write runs/prof_7b/profile_<name>.txt
with the GPU's busy time (the union of kernel spans), the old key_averages sum (which counts op rows and kernel
rows both), a split of kernel time by kind, and the table. The README's numbers and assets/metrics/prof_7b/ come
from three such calls on one H200. Those runs filed cuDNN's attention kernels under "gemm" in the split (fixed
since); the README takes its shares from the tables.
"""
import json, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
import stable_reinforce_core as core

model_path, data = sys.argv[1:3]
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
OUT = "runs/prof_7b"
os.makedirs(OUT, exist_ok=True)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
items = core.load_items(data)
model, processor = core.load_policy(model_path, device="cuda", varlen_vision=False)
n_params = sum(p.numel() for p in model.parameters())
model.gradient_checkpointing_enable({"use_reentrant": False})
core.fsdp2(model, bf16=True)
model.train()
banned = core.vision_token_ids(processor)
V = model.config.text_config.vocab_size
g = torch.Generator().manual_seed(0)


def make_batch(mb, R=1024, start=0):
    msgs = [core.pair_view(it)[0] for it in items[start:start + mb]]
    bad = set(banned) | set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.added_tokens_decoder)
    pool = torch.tensor([i for i in range(500) if i not in bad])
    resp = [pool[torch.randint(0, len(pool), (R,), generator=g)].tolist() for _ in msgs]
    return core.collate(processor, msgs, resp, "cuda")


def step(batch, mask):
    with torch.autocast("cuda", torch.bfloat16):
        logp = core.response_logprobs(model, batch, mask, banned)
    adv = torch.randn_like(logp)
    loss, _ = core.stable_policy_loss(logp, logp.detach() + 0.01, adv, mask.float())
    loss.backward()


def kernel_union(prof):
    """Busy seconds of the GPU: the union of CUDA kernel intervals, and a split by kernel kind."""
    from torch.autograd import DeviceType
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kinds = {}
    for e in ev:
        n = e.name.lower()
        k = ("nccl" if "nccl" in n else "attention" if any(x in n for x in ("flash", "fmha", "attention", "sdpa"))
             else "gemm" if any(x in n for x in ("gemm", "cutlass", "nvjet", "xmma", "cublas")) else
             "copy/cast" if any(x in n for x in ("copy", "memcpy", "cast", "to_copy", "memset")) else "other")
        kinds.setdefault(k, [0.0, 0])
        kinds[k][0] += (e.time_range.end - e.time_range.start) / 1e6
        kinds[k][1] += 1
    return core.gpu_busy_seconds(prof), kinds, len(ev)


variants = [("mb4_sdpa", 4, False, True), ("mb4_varlen", 4, True, True), ("mb2_varlen", 2, True, False),
            ("mb1_varlen", 1, True, False), ("mb8_varlen", 8, True, True), ("mb16_varlen", 16, True, False),
            ("mb16_varlen_prof", 16, True, True), ("mb24_varlen", 24, True, False), ("mb16_sdpa", 16, False, False)]
for name, mb, varlen, profile in variants:
    if only and name not in only:
        continue
    if varlen:
        core.use_varlen_vision_attention(model)
    else:
        model.set_attn_implementation({"vision_config": "sdpa"})
    try:
        batches = [make_batch(mb, start=i * mb) for i in range(4)]
        toks = sum(int(b["attention_mask"].sum()) for b, _ in batches) / len(batches)
        step(*batches[0]); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t = time.time()
        for b in batches[1:]:
            step(*b)
        torch.cuda.synchronize()
        dt = (time.time() - t) / 3
        row = dict(name=name, mb=mb, varlen=varlen, tokens_per_mb=toks, s_per_mb=round(dt, 3), tok_s=round(toks / dt),
                   mfu=round(6 * n_params * toks / dt / 989e12, 4),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
        if profile:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                t = time.time()
                for b in batches[1:3]:
                    step(*b)
                torch.cuda.synchronize()
                wall = time.time() - t
            busy, kinds, n_ev = kernel_union(prof)
            ka = prof.key_averages()
            summed = sum(e.self_device_time_total for e in ka if "nccl" not in e.key.lower()) / 1e6
            row.update(prof_wall=round(wall, 3), busy_union_s=round(busy, 3),
                       busy_union_pct=round(100 * busy / wall, 1),
                       busy_keyavg_sum_s=round(summed, 3), kernels=n_ev,
                       kinds={k: [round(v[0], 3), v[1]] for k, v in sorted(kinds.items(), key=lambda x: -x[1][0])})
            with open(f"{OUT}/profile_{name}.txt", "w") as f:
                f.write(json.dumps(row) + "\n")
                f.write(ka.table(sort_by="self_device_time_total", row_limit=60))
        print(json.dumps(row), flush=True)
        del batches
    except torch.OutOfMemoryError as e:
        print(json.dumps(dict(name=name, oom=str(e)[:200])), flush=True)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
dist.destroy_process_group()
