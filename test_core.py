"""Tests for stable_reinforce_core.py (R1-Reward, arXiv 2505.02835), CPU only.

Every expected number is computed by hand (with `math`) or by a naive Python loop, never by the
function under test. Run: python -m pytest -q test_core.py (about 2 minutes on 2 busy cores);
the last block runs the stage scripts as subprocesses (tests named *stage*): -k "not stage" skips them (~5 s).
"""
import io
import json
import math
import os
import random
import signal
import string
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from stable_reinforce_core import (BadInput, PROMPT_TEMPLATE, RuleJudge, Skipped, StopOnSigint, VQA_FIELDS,
                                   build_messages, format_ok, guarded_step, kl_k1, load_checkpoint, load_items,
                                   majority_vote, open_log, parse_choice, reinforce_returns, reward, rng_state,
                                   save_checkpoint, score_rollouts, set_rng_state, stable_policy_loss,
                                   standardize_and_filter)

LOG_HI = math.log(1e3)                                    # 6.9078: the paper's delta_max in log space
ANS = lambda think, a: f"<think>{think}</think><answer>{a}</answer>"


def ragged_mask(lengths, T):
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


# ---------------------------------------------------------------- 3-sigma filter (section 4.1)
def paper_batch():
    """255 sequences with reward 1 and one with reward 0, 3 response tokens each (A_t = R when beta = 0)."""
    rewards = torch.tensor([1.0] * 255 + [0.0])
    mask = torch.ones(256, 3)
    return reinforce_returns(rewards, mask), mask


def test_paper_three_sigma_example():
    """Population stats: mean 255/256, std sqrt(255)/256 -> the 0 gets z = -sqrt(255) = -15.97 and is zeroed."""
    adv, mask = paper_batch()
    assert torch.all(adv[:255] == 1) and torch.all(adv[255] == 0)
    mean = 255 / 256
    std = math.sqrt(mean * (1 - mean))                    # population std of a Bernoulli(255/256)
    z0, z1 = (0 - mean) / std, (1 - mean) / std
    assert z0 == pytest.approx(-15.9687, abs=1e-4) and z1 == pytest.approx(0.06262, abs=1e-5)
    z, frac = standardize_and_filter(adv, mask)
    assert torch.all(z[255] == 0.0)
    assert torch.allclose(z[:255], torch.full((255, 3), z1), rtol=1e-5)
    assert frac == pytest.approx(1 / 256)


def test_filter_disabled_keeps_outlier():
    """enabled=False (the ablation) only standardises: the 0 keeps z = -sqrt(255)."""
    adv, mask = paper_batch()
    z, frac = standardize_and_filter(adv, mask, enabled=False)
    assert torch.allclose(z[255], torch.full((3,), -math.sqrt(255)), rtol=1e-5)
    assert frac == 0.0


def test_filter_is_centred_on_zero_not_on_raw_mean():
    """[fix B1] 8 rewards of 2.0 and 2 of 0.5: mean 1.7, std 0.6 -> z = +0.5 and -2.0, both within 3 sigma."""
    adv = reinforce_returns(torch.tensor([2.0] * 8 + [0.5] * 2), torch.ones(10, 2))
    z, frac = standardize_and_filter(adv, torch.ones(10, 2))
    assert torch.allclose(z[:8], torch.full((8, 2), 0.5), atol=1e-5)
    assert torch.allclose(z[8:], torch.full((2, 2), -2.0), atol=1e-5)
    assert frac == 0.0


def test_zero_spread_gives_zero_not_nan():
    """All rewards equal (std = 0): z = 0 everywhere, nothing filtered, no NaN."""
    adv = reinforce_returns(torch.full((5,), 1.5), ragged_mask([3, 1, 4, 2, 4], 4))
    z, frac = standardize_and_filter(adv, ragged_mask([3, 1, 4, 2, 4], 4))
    assert torch.all(z == 0) and frac == 0.0


def test_nan_advantage_is_zeroed_and_counted():
    """A NaN advantage on a valid token comes out as 0, the output is finite, and it is counted as filtered."""
    adv = torch.tensor([[1.0, float("nan"), 0.5], [2.0, 0.0, -1.0]])
    z, frac = standardize_and_filter(adv, torch.ones(2, 3))
    assert z[0, 1] == 0 and torch.isfinite(z).all()
    assert frac == pytest.approx(1 / 6)
    # the other five tokens are standardised among themselves: values 1, .5, 2, 0, -1 -> mean .5, var 1
    assert z[1, 0].item() == pytest.approx((2.0 - 0.5) / 1.0, abs=1e-5)


def test_padding_does_not_affect_statistics():
    """Garbage on padding tokens is ignored: z matches a naive loop over valid tokens only."""
    g = torch.Generator().manual_seed(0)
    lengths, T = [5, 2, 7, 1, 4], 7
    mask = ragged_mask(lengths, T)
    adv = torch.randn(5, T, generator=g) + 1000.0 * (1 - mask)     # huge values on padding
    adv[1, 0] = 8.0                                                  # one outlier among 19 tokens
    vals = [adv[i, t].item() for i in range(5) for t in range(lengths[i])]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    z, frac = standardize_and_filter(adv, mask)
    n_drop = 0
    for i in range(5):
        for t in range(T):
            if t >= lengths[i]:
                assert z[i, t] == 0
                continue
            zz = (adv[i, t].item() - mean) / std
            n_drop += abs(zz) > 3
            assert z[i, t].item() == pytest.approx(0.0 if abs(zz) > 3 else zz, abs=1e-5)
    assert n_drop == 1 and frac == pytest.approx(1 / 19)


def test_nan_on_padding_is_ignored():
    """A NaN on a padding token (mask 0) must not change the statistics of the valid tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 2.0]])
    z, frac = standardize_and_filter(adv, mask)                     # valid: 1,0,0,1,2 -> mean 0.8, var 0.56
    assert z[0, 0].item() == pytest.approx((1 - 0.8) / math.sqrt(0.56), abs=1e-5)
    assert frac == 0.0


def test_zero_spread_non_dyadic_constant():
    """A constant advantage that is not a dyadic float (1.7, 0.1) still has zero spread: z = 0, nothing filtered."""
    for v in (1.7, 0.1):
        for shape in ((100, 333), (256, 1000)):
            z, frac = standardize_and_filter(torch.full(shape, v), torch.ones(shape))
            assert frac == 0.0 and z.abs().max().item() < 1e-3


class FakeGroup:
    """Thread-based stand-in for torch.distributed: all_reduce sums a tensor over all ranks, in place."""
    def __init__(self, n):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def all_reduce_for(self, rank):
        def all_reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)                        # same order on every rank -> same result
            self.barrier.wait()
            t.copy_(total)
        return all_reduce


def test_two_rank_all_reduce_matches_whole_batch():
    """Paper batch split over 2 ranks: rank 1 alone has the 0, and global stats still give z = -15.97 -> 0."""
    adv, mask = paper_batch()
    parts = [(adv[:128], mask[:128]), (adv[128:], mask[128:])]   # rank 0: all 1s; rank 1: 127 ones + the 0
    group = FakeGroup(2)
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(standardize_and_filter, a, m, all_reduce=group.all_reduce_for(r))
                for r, (a, m) in enumerate(parts)]
        (z0, f0), (z1, f1) = [f.result(timeout=10) for f in futs]
    z1_expected = 1 / math.sqrt(255)
    assert torch.allclose(z0, torch.full((128, 3), z1_expected), rtol=1e-5)
    assert torch.allclose(z1[:127], torch.full((127, 3), z1_expected), rtol=1e-5)
    assert torch.all(z1[127] == 0)
    assert f0 == pytest.approx(1 / 256) and f1 == pytest.approx(1 / 256)
    _, f_local = standardize_and_filter(*parts[0])              # without the reduce, rank 0 sees no spread
    assert f_local == 0.0


# ---------------------------------------------------------------- Pre-CLIP PPO loss (section 4.1)
@pytest.mark.parametrize("pre_clip,expected", [(True, 1000.0), (False, math.exp(20))])
def test_preclip_bounds_ratio_and_gradient(pre_clip, expected):
    """log-ratio +20, A = -1: Pre-CLIP gives rho = loss = 1000 and zero gradient; without it loss = grad = e^20."""
    logp = torch.tensor([[20.0]], dtype=torch.float64, requires_grad=True)
    zero, adv, mask = torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1)
    loss, stats = stable_policy_loss(logp, zero, adv, mask, pre_clip=pre_clip)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert logp.grad.item() == (0.0 if pre_clip else pytest.approx(expected, rel=1e-12))  # d(-rho*A)/dlogp = rho
    assert stats["preclip_frac"] == 1.0


def test_lower_bound_is_delta_min():
    """log-ratio -20, A = +1: rho = delta_min = 1e-3 (log -6.9078), token loss -min(1e-3, 0.8) = -1e-3."""
    lr = torch.tensor([[-20.0, -LOG_HI + 0.01]], dtype=torch.float64)
    loss, stats = stable_policy_loss(lr, torch.zeros_like(lr), torch.ones_like(lr), torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(-1e-3, rel=1e-12)
    assert stats["preclip_frac"] == 1.0                     # the second token is inside bounds and padded anyway


def naive_ppo_loss(logp, logp_old, adv, mask, eps=0.2, lo=math.log(1e-3), hi=math.log(1e3)):
    seq_losses = []
    for i in range(len(mask)):
        tok = []
        for t in range(len(mask[i])):
            if mask[i][t]:
                rho = math.exp(min(max(logp[i][t] - logp_old[i][t], lo), hi))
                a = adv[i][t]
                tok.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
        seq_losses.append(sum(tok) / len(tok))
    return sum(seq_losses) / len(seq_losses)


def test_policy_loss_matches_naive_loop():
    """Random inputs, ragged mask: loss = mean over sequences of the masked token mean of the PPO surrogate."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    mask = ragged_mask([9, 3, 1, 6, 8, 2], T)
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = logp_old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4   # ratios around 1 +- 0.4
    logp[0, 0] = logp_old[0, 0] + 9.0                       # and one beyond delta_max
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    expected = naive_ppo_loss(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist())
    loss, _ = stable_policy_loss(logp, logp_old, adv, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_policy_loss_hand_example_and_fractions():
    """Hand-computed loss, preclip_frac and clip_frac; padding (log-ratio 50) counts in neither."""
    lr = torch.tensor([[20.0, -10.0, math.log(1.5), math.log(0.9), 50.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 0, 0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    # row 0 token losses: 1000 (pre-clipped ratio), -0.001 (pre-clipped), -1.2 (PPO clip), -0.9; row 1: -2
    row0 = (1000 - 0.001 - 1.2 - 0.9) / 4
    loss, stats = stable_policy_loss(lr, torch.zeros_like(lr), adv, mask)
    assert loss.item() == pytest.approx((row0 - 2.0) / 2, rel=1e-12)      # sequence mean, not token mean
    assert stats["preclip_frac"] == pytest.approx(2 / 5)
    assert stats["clip_frac"] == pytest.approx(1 / 5)                       # only the ratio-1.5, A>0 token
    assert stats["max_token_loss"] == pytest.approx(1000.0)


def test_ppo_clip_gradient():
    """Inside bounds: rho = 1.5, A = +1 is PPO-clipped (grad 0); rho = 1.5, A = -1 is not (grad = -rho*A = 1.5)."""
    logp = torch.tensor([[math.log(1.5), math.log(1.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = stable_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), adv, torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(1.5 / 2)


# ---------------------------------------------------------------- Reinforce++ returns (section 3.2)
def test_returns_docstring_example():
    """R = 2, beta = 0.5, KL = [0.2, 0, 0.4]: r = [-0.1, 0, 1.8] -> G = [1.7, 1.8, 1.8]."""
    G = reinforce_returns(torch.tensor([2.0]), torch.ones(1, 3), kl=torch.tensor([[0.2, 0.0, 0.4]]), beta=0.5)
    assert torch.allclose(G, torch.tensor([[1.7, 1.8, 1.8]]), atol=1e-6)


def test_returns_ragged_matches_naive_loop():
    """Reward on the last valid token, -beta*KL per valid token, reverse cumsum; 0 on padding (KL garbage there)."""
    g = torch.Generator().manual_seed(2)
    lengths, T, beta = [4, 1, 6, 3], 6, 0.3
    mask = ragged_mask(lengths, T)
    R = torch.tensor([2.0, 0.5, -1.0, 1.5])
    kl = torch.randn(4, T, generator=g) * 0.1 + 50.0 * (1 - mask)
    G = reinforce_returns(R, mask, kl=kl, beta=beta)
    for i, n in enumerate(lengths):
        r = [(R[i].item() if t == n - 1 else 0.0) - beta * kl[i, t].item() for t in range(n)]
        for t in range(T):
            expected = sum(r[t:]) if t < n else 0.0
            assert G[i, t].item() == pytest.approx(expected, abs=1e-5)


def test_returns_ignore_inf_on_padding():
    """An inf KL on a padding token must not leak: R=1, KL=[.1,.1,inf], mask [1,1,0], beta .5 -> [.9,.95,0]."""
    G = reinforce_returns(torch.tensor([1.0]), torch.tensor([[1, 1, 0]]),
                          torch.tensor([[0.1, 0.1, float("inf")]]), beta=0.5)
    assert torch.allclose(G, torch.tensor([[0.9, 0.95, 0.0]]))


def test_returns_beta_zero_ignores_kl():
    """beta = 0: every valid token's return is R, whatever the KL."""
    mask = ragged_mask([2, 3], 3)
    G = reinforce_returns(torch.tensor([1.5, -0.5]), mask, kl=torch.full((2, 3), 7.0), beta=0.0)
    assert G.tolist() == [[1.5, 1.5, 0.0], [-0.5, -0.5, -0.5]]


def test_kl_k1():
    """k1 estimator: KL_t = log pi_old - log pi_ref."""
    assert kl_k1(torch.tensor([-1.0, -0.5]), torch.tensor([-1.25, -2.0])).tolist() == [0.25, 1.5]


# ---------------------------------------------------------------- Reward (section 4.3)
@pytest.mark.parametrize("result,consistency,fmt,expected", [
    (1, 1, 1, 2.0), (1, 0, 1, 1.5), (0, 0, 1, 0.5), (0, 1, 1, 0.5), (0, 0, 0, 0.0), (1, 1, 0, 1.5), (1, 0, 0, 1.0)])
def test_reward_table(result, consistency, fmt, expected):
    """R = Result * (1 + 0.5 * Consistency) + 0.5 * Format, the paper's table of values."""
    assert reward(result, consistency, fmt) == expected


# ---------------------------------------------------------------- Parsing
@pytest.mark.parametrize("text,choice", [
    ("<think>x</think><answer>1</answer>", 1), ("<think>x</think><answer> 2 </answer>", 2),
    ("<think>x</think><answer>\n2\n</answer>", 2), ("I choose 2", None), ("<think>2</think>", None),
    ("<think>x</think><answer>2</answer><answer>1</answer>", 2), ("<answer>1/2</answer>", None),
    ("<answer>Response 2</answer>", None), ("<answer>3</answer>", None), ("<answer>0</answer>", None),
    ("<answer></answer>", None), ("<answer>12</answer>", None)])
def test_parse_choice(text, choice):
    """Only a bare 1 or 2 inside the FIRST <answer> tag counts."""
    assert parse_choice(text) == choice


@pytest.mark.parametrize("text,ok", [
    ("<think>x</think><answer>1</answer>", True),
    ("  \n<think>x</think><answer>1</answer>\n ", True),                   # whole-text whitespace is fine
    ("<think>line 1\nline 2\n\nResponse 1 is better</think><answer>1</answer>", True),
    ("<think>x</think>\n<answer>1</answer>", False),                        # nothing between the tags
    ("<think>x</think> <answer>1</answer>", False),
    ("Sure! <think>x</think><answer>1</answer>", False),                    # text outside the tags
    ("<think>x</think><answer>1</answer> done", False),
    ("<think>x</think><answer>1</answer><answer>2</answer>", False),        # two answers
    ("<think>a</think><think>b</think><answer>1</answer>", False),
    ("<answer>1</answer>", False), ("<think>x</think>", False), ("", False)])
def test_format_ok(text, ok):
    """Exactly <think>...</think><answer>...</answer>, one of each tag, after stripping the whole text."""
    assert format_ok(text) is ok


# ---------------------------------------------------------------- Consistency judge
def test_rule_judge_last_statement_counts():
    """The LAST 'Response N is better' (any case) decides; no statement -> 0."""
    items = [("q", "Response 1 is better at first... but RESPONSE 2 IS BETTER overall", 2),
             ("q", "Response 1 is better at first... but response 2 is the better", 1),
             ("q", "response 1 is better", 1),
             ("q", "Both are fine; I pick 1.", 1),
             ("q", "Response 2 is not better", 2)]
    assert RuleJudge()(items) == [1, 0, 1, 0, 0]


class SpyJudge:
    def __init__(self, verdicts):
        self.verdicts, self.calls = verdicts, []

    def __call__(self, items):
        self.calls.append(list(items))
        return self.verdicts[:len(items)]


def test_score_rollouts_asks_judge_only_when_correct():
    """Judge sees only Result = 1 rollouts; None verdict = 0; rewards follow the section 4.3 formula."""
    texts = [ANS("a", 2),                      # correct, formatted, judge 1     -> 2.0
             ANS("b", 1),                      # correct, formatted, judge 0     -> 1.5
             ANS("c", 2),                      # wrong (label 1), formatted      -> 0.5
             ANS("d", 3),                      # unparseable, formatted          -> 0.5
             "e <answer>2</answer>",           # correct, unformatted, judge None -> 1.0
             "no tags at all"]                 # wrong, unformatted              -> 0.0
    labels, questions = [2, 1, 1, 2, 2, 1], [f"q{i}" for i in range(6)]
    judge = SpyJudge([1, 0, None])
    out = score_rollouts(texts, labels, questions, judge)
    assert judge.calls == [[("q0", "a", 2), ("q1", "b", 1), ("q4", "e <answer>2</answer>", 2)]]
    assert out["result"] == [1, 1, 0, 0, 1, 0]
    assert out["format"] == [1, 1, 1, 1, 0, 0]
    assert out["consistency"] == [1, 0, 0, 0, 0, 0]
    assert out["choice"] == [2, 1, 2, None, 2, None]
    assert out["reward"] == [2.0, 1.5, 0.5, 0.5, 1.0, 0.0]


def test_score_rollouts_no_correct_means_no_judge_call():
    """If no rollout is correct the judge is never called."""
    judge = SpyJudge([])
    out = score_rollouts([ANS("x", 1)], [2], ["q"], judge)
    assert judge.calls == [] and out["reward"] == [0.5]


# ---------------------------------------------------------------- Voting@K (section 5.1)
@pytest.mark.parametrize("votes,winner", [
    ([1, 2, 2], 2), ([1, None, 2], None), ([None, None, 1], 1), ([], None), ([None, None], None),
    ([1, 1, 2, None, None], 1), ([2, 1], None)])
def test_majority_vote(votes, winner):
    """Most frequent parseable choice; ties (including no votes) -> None."""
    assert majority_vote(votes) == winner


# ---------------------------------------------------------------- load_items
def png_bytes(color="red", size=56):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(tmp_path, rows):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "cut.png").write_bytes(png_bytes()[:60])          # a PNG cut short: the header survives
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = dict(id="p0", image="img/a.png", question="q", response1="r1", response2="r2", label=1)


def test_load_items_good_file(tmp_path):
    """Blank lines are skipped; the image path is resolved relative to the file's folder; extra keys kept."""
    path = write_pairs(tmp_path, ["", GOOD, "   ", dict(GOOD, id="p1", label=2, think="t")])
    items = load_items(path)
    assert [it["id"] for it in items] == ["p0", "p1"]
    assert items[0]["image"] == str(tmp_path / "img" / "a.png") and items[1]["think"] == "t"
    assert [it["where"] for it in items] == [f"{path}:2", f"{path}:4"]


# one row per bad-input class: (row, reason counted by default, words of the --strict error)
BAD_ROWS = [
    ('{"id": "p1", "image": ', "malformed_json", "malformed JSON"),
    ('["a list", "not an object"]', "missing_field", "missing field"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "missing_field", "question"),
    (dict(GOOD, image="img/missing.png"), "missing_image", "image not found"),
    (dict(GOOD, image=None), "missing_image", "image not found"),
    (dict(GOOD, image="img/cut.png"), "corrupt_image", "cannot be decoded"),
    (dict(GOOD, label=3), "bad_label", "label must be 1 or 2"),
    (dict(GOOD, label=True), "bad_label", "label must be 1 or 2"),
    (dict(GOOD, label="1"), "bad_label", "label must be 1 or 2"),
    (dict(GOOD, question="  "), "empty_text", "question"),
    (dict(GOOD, response2=""), "empty_text", "response2"),
    (dict(GOOD, response1=None), "empty_text", "response1")]


@pytest.mark.parametrize("bad,reason,needle", BAD_ROWS)
def test_load_items_strict_names_path_and_line(tmp_path, bad, reason, needle):
    """--strict: a bad 3rd line (after a blank 2nd) raises BadInput naming path:3 and the problem."""
    path = write_pairs(tmp_path, [GOOD, "", bad])
    with pytest.raises(BadInput) as e:
        load_items(path, strict=True)
    msg = str(e.value)
    assert f"{path}:3:" in msg and needle in msg


@pytest.mark.parametrize("bad,reason,needle", BAD_ROWS)
def test_load_items_skips_and_counts_by_reason(tmp_path, capsys, bad, reason, needle):
    """Default: the bad row is skipped, counted under its reason, and printed with path:line; good rows stay."""
    path = write_pairs(tmp_path, [GOOD, bad, dict(GOOD, id="p2")])
    skipped = Skipped()
    items = load_items(path, skipped=skipped)
    assert [it["id"] for it in items] == ["p0", "p2"]
    assert dict(skipped) == {reason: 1}
    assert f"{path}:2: " in capsys.readouterr().out


def test_vqa_items_need_a_non_empty_answer(tmp_path):
    """VQA rows: "answer" is a required text field; response1/2 are not."""
    vqa = dict(id="v0", image="img/a.png", question="q", answer="red")
    path = write_pairs(tmp_path, [vqa, dict(vqa, answer=" "), {k: v for k, v in vqa.items() if k != "answer"}])
    skipped = Skipped()
    assert [it["id"] for it in load_items(path, fields=VQA_FIELDS, skipped=skipped)] == ["v0"]
    assert dict(skipped) == {"empty_text": 1, "missing_field": 1}


# ---------------------------------------------------------------- Prompt (Table 1)
def test_prompt_template_verbatim():
    """Key verbatim pieces of Table 1, including the two spaces before the newlines."""
    assert "###### [Question]:\n{question}  \n\n" in PROMPT_TEMPLATE
    assert "###### [Response 1]:\n{answer1}  \n\n###### [Response 2]:\n{answer2}  \n\n" in PROMPT_TEMPLATE
    assert PROMPT_TEMPLATE.startswith("You are a highly skilled and impartial evaluator")
    assert PROMPT_TEMPLATE.endswith("<think>Your detailed comparative analysis goes here</think><answer>1/2</answer>")
    fields = [f for _, f, _, _ in string.Formatter().parse(PROMPT_TEMPLATE) if f is not None]
    assert fields == ["question", "answer1", "answer2"]


def test_build_messages_image_first():
    """One user turn: the image, then the filled-in prompt text."""
    image = object()
    msgs = build_messages("What is {x}?", "A", "B", image)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    img, txt = msgs[0]["content"]
    assert img == {"type": "image", "image": image} and txt["type"] == "text"
    assert "###### [Question]:\nWhat is {x}?  \n\n###### [Response 1]:\nA  \n\n###### [Response 2]:\nB  \n\n" \
        in txt["text"]


# ================================================================ Reliability (issue 8)
# Core helpers in-process first (fast); then the stage scripts as subprocesses on a tiny generated data set,
# SIGKILLed / Ctrl-C'd mid-run and resumed (marked "STAGE SUBPROCESS"; about a minute on 2 CPU cores).
def test_rng_state_round_trip():
    """After set_rng_state, python and torch draw exactly what they drew right after the capture."""
    state = rng_state()
    first = (random.random(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == first


def test_checkpoint_survives_a_crash_mid_save(tmp_path, monkeypatch):
    """A save that dies half-way leaves a partial .tmp and the previous checkpoint loadable and unchanged."""
    path = tmp_path / "resume.pt"
    save_checkpoint(path, step=1, weights=torch.arange(4.0), args={})
    real_save = torch.save

    def crash(obj, f):                                  # write some bytes, then die like a killed process would
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, step=2, weights=torch.zeros(4), args={})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "resume.pt.tmp").read_bytes() == b"\x80\x02partial"
    state = load_checkpoint(path)
    assert state["step"] == 1 and state["weights"].tolist() == [0.0, 1.0, 2.0, 3.0]
    save_checkpoint(path, step=3, weights=torch.ones(4), args={})   # the next save replaces the partial file
    assert load_checkpoint(path)["step"] == 3 and not (tmp_path / "resume.pt.tmp").exists()


def test_guarded_step_skips_non_finite_and_keeps_weights_bit_identical():
    """One good AdamW step, then a NaN loss and an inf gradient: weights and optimizer state stay bit-identical."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    model(x).pow(2).mean().backward()
    assert guarded_step(model, opt, True)[1] is True
    before = [p.detach().clone() for p in model.parameters()]
    adam_before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    loss = model(x).pow(2).mean() * float("nan")        # a poisoned loss, as --inject-nan-at does
    loss.backward()
    gnorm, ok = guarded_step(model, opt, math.isfinite(loss.item()))
    assert not ok and math.isnan(gnorm)
    (model(x).sum() * float("inf")).backward()          # a finite-looking loss flag but an inf gradient
    assert guarded_step(model, opt, True)[1] is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(adam_before[k], opt.state[model.weight][k]) for k in adam_before)
    assert all(p.grad is None for p in model.parameters())


def test_open_log_drops_rows_after_the_checkpoint(tmp_path):
    """On resume, rows after the checkpoint's step and a line cut by a kill are dropped; new rows append."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with open_log(path, resume_step=2) as log:
        log.write('{"step": 3, "again": true}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "again": true}\n'
    open_log(path).close()                              # a fresh run starts an empty log
    assert path.read_text() == ""


def test_stop_on_sigint_sets_a_flag_then_raises():
    """The first Ctrl-C only sets .requested (the loop saves and exits 0); a second one raises KeyboardInterrupt."""
    old = signal.getsignal(signal.SIGINT)
    try:
        stop = StopOnSigint()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, old)


def test_skipped_strict_raises_instead_of_counting():
    skipped = Skipped(strict=True)
    with pytest.raises(BadInput, match="f.jsonl:7: prompt has 900 tokens"):
        skipped.add("f.jsonl:7", "prompt_too_long", "prompt has 900 tokens")
    assert sum(skipped.values()) == 0


# ---------------------------------------------------------------- STAGE SUBPROCESS tests (tiny data, tiny model)
REPO = Path(__file__).resolve().parent
COLORS4 = ["red", "green", "blue", "yellow"]
LONG_QUESTION = " ".join(f"x{i}y" for i in range(300))          # ~1000 tokens with the tiny BPE: over the limit
# one bad pair row per class, and what the stages that read train_pairs.jsonl must count
BAD_PAIR_ROWS = ['{"id": "bad-json", "image": ',
                 dict(id="bad-missing", image="images/missing.png", question="q?", response1="a", response2="b", label=1),
                 dict(id="bad-corrupt", image="images/corrupt.png", question="q?", response1="a", response2="b", label=1),
                 dict(id="bad-label", image="images/red.png", question="q?", response1="a", response2="b", label=3),
                 dict(id="bad-empty-q", image="images/red.png", question="", response1="a", response2="b", label=1),
                 dict(id="bad-empty-r", image="images/red.png", question="q?", response1="a", response2=" ", label=2),
                 dict(id="bad-long", image="images/red.png", question=LONG_QUESTION, response1="a", response2="b", label=1)]
PAIR_SKIPS = dict(malformed_json=1, missing_image=1, corrupt_image=1, bad_label=1, empty_text=2, prompt_too_long=1)
SFT = ["--steps", "8", "--batch-size", "2", "--vqa-batch-size", "2", "--see-first", "2", "--save-every", "2",
       "--hidden", "48", "--layers", "1", "--max-prompt-tokens", "400"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """8 good pairs + 8 good VQA items on 4 generated images, plus one bad pair row per class and one VQA row
    with an empty answer. Written directly (no 01 run)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    for c in COLORS4:
        (root / "images" / f"{c}.png").write_bytes(png_bytes(c))
    (root / "images" / "corrupt.png").write_bytes(png_bytes("red")[:60])
    pairs, vqa = [], []
    for i in range(8):
        right, wrong, label = COLORS4[i % 4], COLORS4[(i + 1) % 4], 1 + i % 2
        r1, r2 = (right, wrong) if label == 1 else (wrong, right)
        pairs.append(dict(id=f"p{i}", image=f"images/{right}.png", question="What color is the shape?",
                          response1=r1, response2=r2, label=label, think=f"The image is {right}. Response {label} is better."))
        vqa.append(dict(id=f"v{i}", image=f"images/{right}.png", question="What color is the shape?", answer=right))
    write = lambda name, rows: (root / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    write("train_pairs.jsonl", pairs[:4] + BAD_PAIR_ROWS + pairs[4:])
    write("train_vqa.jsonl", vqa + [dict(vqa[0], id="bad-empty-answer", answer="")])
    return root


def run_stage(script, args, log, signal_when=None, sig=None):
    """Run one stage script; if signal_when() becomes true while it runs, send it `sig`. Returns (rc, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
        while signal_when and proc.poll() is None and not signal_when():
            time.sleep(0.01)
        if signal_when and proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    return rc, Path(log).read_text()


def run_stages(*jobs):
    """Independent run_stage jobs, two at a time (most of each is importing torch and transformers)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda job: run_stage(*job), jobs))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pick(rows, keys):
    """The given fields of each metrics row, as JSON text (so that a logged NaN equals a logged NaN)."""
    return [json.dumps({k: r[k] for k in keys}) for r in rows]


def ckpt_step(out):
    return torch.load(out / "resume.pt", weights_only=False)["step"]


def weights_of(folder):
    """The model's state_dict as the stages hold it (the file's key names differ from the module's)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).state_dict()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_weights(a, b):
    from safetensors.torch import load_file
    return same_state(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"))


def kill_interrupt_resume(script, args, out, steps):
    """SIGKILL once the first checkpoint exists; resume and Ctrl-C once it writes a newer one; resume to the end,
    with a partial resume.pt.tmp planted first (a crash mid-save). Asserts each interruption really hit mid-run."""
    rc, _ = run_stage(script, args, out.with_suffix(".a.log"), lambda: (out / "resume.pt").exists(), signal.SIGKILL)
    killed_at = ckpt_step(out)
    assert rc == -signal.SIGKILL and killed_at < steps
    mtime = (out / "resume.pt").stat().st_mtime_ns
    rc, log = run_stage(script, args + ["--resume"], out.with_suffix(".b.log"),
                        lambda: (out / "resume.pt").stat().st_mtime_ns != mtime, signal.SIGINT)
    interrupted_at = ckpt_step(out)
    assert rc == 0 and "interrupted: saved" in log and killed_at < interrupted_at < steps, log[-2000:]
    (out / "resume.pt.tmp").write_bytes(b"half a checkpoint")
    rc, log = run_stage(script, args + ["--resume"], out.with_suffix(".c.log"))
    assert rc == 0 and f"resumed from {out / 'resume.pt'} at step {interrupted_at}" in log, log[-2000:]


@pytest.fixture(scope="module")
def sft(tiny, tmp_path_factory):
    """Two tiny SFT runs side by side: "ref", uninterrupted with a NaN injected at step 3 (its model also starts the
    stage 3 and 4 tests), and "nan", with NaN at steps 1 and 2 and --max-bad-steps 2. Returns out folders and (rc, log)."""
    root = tmp_path_factory.mktemp("sft")
    ref, nan = run_stages(("02_sft.py", ["--data", tiny, "--out", root / "ref", *SFT, "--inject-nan-at", 3], root / "ref.log"),
                          ("02_sft.py", ["--data", tiny, "--out", root / "nan", *SFT, "--inject-nan-at", 1, 2,
                                         "--max-bad-steps", 2], root / "nan.log"))
    assert ref[0] == 0, ref[1][-3000:]
    return dict(ref=root / "ref", nan=root / "nan", nan_result=nan)


@pytest.fixture(scope="module")
def sft_ref(sft):
    return sft["ref"]


def test_stage2_kill_ctrl_c_resume_matches_uninterrupted_run(tiny, sft_ref):
    """STAGE SUBPROCESS. Killed, resumed, Ctrl-C'd, resumed: same steps, same items per step, same losses and
    bit-identical final weights as the uninterrupted run. Also: the NaN step 3 is skipped the same way."""
    out = sft_ref.parent / "killed"
    kill_interrupt_resume("02_sft.py", ["--data", tiny, "--out", out, *SFT, "--inject-nan-at", 3], out, steps=8)
    ref, got = rows(sft_ref), rows(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    keys = ("step", "pair_ids", "vqa_ids", "loss", "grad_norm", "lr", "skipped_step")
    assert pick(got, keys) == pick(ref, keys)
    assert [r["skipped_step"] for r in ref] == [False, False, True] + [False] * 5 and math.isnan(ref[2]["loss"])
    seen = lambda rs: Counter(i for r in rs for i in r["pair_ids"] + r["vqa_ids"])
    assert seen(got) == seen(ref) and not any(i.startswith("bad") for i in seen(ref))
    assert [r["pair_ids"] for r in ref[:2]] == [[], []] and all(len(r["pair_ids"]) == 2 for r in ref[2:])
    assert same_weights(sft_ref / "model", out / "model")


def test_stage2_meta_counts_bad_rows_and_strict_names_the_line(tiny, sft_ref):
    """STAGE SUBPROCESS. meta.json counts each planted bad row under its reason; --strict stops at the first one."""
    meta = json.loads((sft_ref / "meta.json").read_text())
    assert meta["skipped_items"] == dict(PAIR_SKIPS, empty_text=3) and meta["skipped_steps"] == 1
    rc, log = run_stage("02_sft.py", ["--data", tiny, "--out", sft_ref.parent / "strict", *SFT, "--strict"],
                        sft_ref.parent / "strict.log")
    assert rc != 0 and f"BadInput: {tiny / 'train_pairs.jsonl'}:5: malformed JSON" in log


def test_stage2_stops_after_k_non_finite_steps_with_usable_checkpoint(sft):
    """STAGE SUBPROCESS. NaN at steps 1 and 2 with --max-bad-steps 2: exit 1 with a message; the checkpoint holds
    the initial weights bit for bit (no update ever happened) and an empty optimizer state."""
    out, (rc, log) = sft["nan"], sft["nan_result"]
    assert rc == 1 and "2 non-finite steps in a row" in log
    ck = torch.load(out / "resume.pt", weights_only=False)
    assert ck["step"] == 2 and ck["opt"]["state"] == {} and [r["skipped_step"] for r in rows(out)] == [True, True]
    assert same_state(weights_of(out / "init"), ck["model"])


def test_stage2_init_prompt_length_matches_the_processor(tiny, sft_ref):
    """drop_long_prompts counts prompt tokens like the processor does (image tokens included): with the limit at
    the median true length it keeps exactly the items whose collated prompt is that long or shorter."""
    from stable_reinforce_core import collate, drop_long_prompts, load_policy, pair_view
    _, processor = load_policy(sft_ref / "init")
    items = load_items(tiny / "train_pairs.jsonl", skipped=Skipped())
    items[1] = dict(items[1], question="What colour, exactly, is the shape in this picture?")
    true = collate(processor, [pair_view(it)[0] for it in items])[0]["attention_mask"].sum(-1).tolist()
    limit = sorted(true)[len(true) // 2]
    skipped = Skipped()
    kept = drop_long_prompts(items, processor, limit, skipped)
    assert [it["id"] for it in kept] == [it["id"] for it, n in zip(items, true) if n <= limit]
    assert skipped["prompt_too_long"] == sum(n > limit for n in true) > 0


def test_stage1_jsonl_source_counts_bad_rows_and_strict(tiny, tmp_path):
    """STAGE SUBPROCESS. 01 --source jsonl skips and counts the bad rows (all but the prompt length, which needs
    the tokenizer built in 02); --strict names file:line."""
    pairs = tiny / "train_pairs.jsonl"
    (rc, log), (rc_strict, log_strict) = run_stages(
        ("01_build_data.py", ["--source", "jsonl", "--pairs", pairs, "--out", tmp_path / "a"], tmp_path / "a.log"),
        ("01_build_data.py", ["--source", "jsonl", "--pairs", pairs, "--out", tmp_path / "b", "--strict"], tmp_path / "b.log"))
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert rc == 0 and meta["skipped_items"] == {k: v for k, v in PAIR_SKIPS.items() if k != "prompt_too_long"}
    assert meta["counts"]["train_pairs"] + meta["counts"]["test_pairs"] == 9       # 8 good + the long one
    assert rc_strict != 0 and f"{pairs}:5: malformed JSON" in log_strict


def test_stage3_counts_bad_rows(tiny, sft_ref, tmp_path):
    """STAGE SUBPROCESS. 03 mines only the 8 good items and records every skipped row in meta.json."""
    rc, log = run_stage("03_mine_hard.py", ["--data", tiny / "train_pairs.jsonl", "--model", sft_ref / "model",
                                            "--out", tmp_path, "--num-items", 0, "--attempts", 1, "--max-new-tokens", 4,
                                            "--max-prompt-tokens", 400], tmp_path / "log")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert rc == 0 and meta["tried"] == 8 and meta["skipped_items"] == PAIR_SKIPS, log[-2000:]


RL = ["--steps", "5", "--rollout-batch", "2", "--train-batch", "2", "--micro-batch", "2", "--max-new-tokens", "8",
      "--save-every", "1", "--max-prompt-tokens", "400"]


@pytest.fixture(scope="module")
def rl(tiny, sft_ref):
    """Two tiny RL runs side by side from the tiny SFT model: "ref", uninterrupted, and "nan", with a NaN loss in
    steps 1 and 2 and --max-bad-steps 2."""
    data = ["--data", tiny / "train_pairs.jsonl", "--model", sft_ref / "model"]
    root = sft_ref.parent
    ref, nan = run_stages(("04_stable_reinforce.py", [*data, "--out", root / "rl_ref", *RL], root / "rl_ref.log"),
                          ("04_stable_reinforce.py", [*data, "--out", root / "rl_nan", *RL, "--inject-nan-at", 1, 2,
                                                      "--max-bad-steps", 2], root / "rl_nan.log"))
    assert ref[0] == 0, ref[1][-3000:]
    return dict(data=data, ref=root / "rl_ref", nan=root / "rl_nan", nan_result=nan)


def test_stage4_kill_ctrl_c_resume_matches_uninterrupted_run(sft_ref, rl):
    """STAGE SUBPROCESS. As for stage 2: same steps, prompts, samples, rewards and losses, bit-identical final
    weights; meta.json counts the bad rows. The tiny model earns the same reward on every rollout, so advantages
    and updates are 0 here: "logp" (mean log-prob of the sampled tokens) is what checks the restored RNG."""
    ref_out, out = rl["ref"], sft_ref.parent / "rl_killed"
    kill_interrupt_resume("04_stable_reinforce.py", [*rl["data"], "--out", out, *RL], out, steps=5)
    keys = ("step", "ids", "logp", "reward", "accuracy", "policy_loss", "grad_norm", "response_len", "skipped_steps")
    assert pick(rows(out), keys) == pick(rows(ref_out), keys)
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]
    assert same_weights(ref_out / "model", out / "model")
    assert json.loads((ref_out / "meta.json").read_text())["skipped_items"] == PAIR_SKIPS


def test_stage4_stops_after_k_non_finite_steps_with_usable_checkpoint(sft_ref, rl):
    """STAGE SUBPROCESS. NaN loss in steps 1 and 2, --max-bad-steps 2: exit 1; the checkpoint holds the starting
    (SFT) weights bit for bit and no optimizer state."""
    out, (rc, log) = rl["nan"], rl["nan_result"]
    assert rc == 1 and "2 non-finite optimizer steps in a row" in log, log[-2000:]
    ck = torch.load(out / "resume.pt", weights_only=False)
    assert ck["step"] == 2 and ck["opt"]["state"] == {} and [r["skipped_steps"] for r in rows(out)] == [1, 1]
    assert same_state(weights_of(sft_ref / "model"), ck["model"])
