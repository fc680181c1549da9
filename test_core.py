"""Tests for stable_reinforce_core.py (R1-Reward, arXiv 2505.02835), CPU only.

Every expected number is computed by hand (with `math`) or by a naive Python loop, never by the
function under test. Two blocks test the API judge and stage 1's real-data loaders against real HTTP servers
on loopback (no network needed). The reliability block runs the stage scripts as subprocesses (tests named
*stage*; -k "not stage" skips them). The vLLM block needs CUDA and vLLM and is skipped elsewhere.
Run: python -m pytest -q test_core.py
"""
import base64
import io
import json
import math
import os
import random
import re
import runpy
import signal
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from stable_reinforce_core import (APIJudge, BadInput, ChatClient, PROMPT_TEMPLATE, RuleJudge, Skipped,
                                   StopOnSigint, VQA_FIELDS, build_messages, format_ok, gpu_busy_seconds,
                                   guarded_step, kl_k1, load_checkpoint, load_items, majority_vote, open_log,
                                   parse_choice, parse_judge_reply, reinforce_returns, reward, rng_state,
                                   save_checkpoint, score_rollouts, set_rng_state, stable_policy_loss,
                                   standardize_and_filter, warmup_cosine)

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


def test_filter_zeroes_every_wrong_rollout_once_fewer_than_a_tenth_are_wrong():
    """Two reward levels (2.0 right, 0.5 wrong), q = share wrong: the wrong rollouts get z = -sqrt((1 - q) / q),
    which is beyond -3 exactly when q < 1/10. 9 wrong of 100: z = -sqrt(91/9) = -3.180, all 9 zeroed;
    11 of 100: z = -sqrt(89/11) = -2.844, all kept. So a batch over 90% right keeps only its right rollouts."""
    for n_wrong, z_wrong, filtered in ((9, -3.1798, True), (11, -2.8445, False)):
        n_right = 100 - n_wrong
        adv = reinforce_returns(torch.tensor([2.0] * n_right + [0.5] * n_wrong), torch.ones(100, 2))
        z, frac = standardize_and_filter(adv, torch.ones(100, 2))
        assert z_wrong == pytest.approx(-math.sqrt(n_right / n_wrong), abs=1e-4)
        assert torch.allclose(z[:n_right], torch.full((n_right, 2), math.sqrt(n_wrong / n_right)), atol=1e-5)
        if filtered:
            assert torch.all(z[n_right:] == 0) and frac == pytest.approx(n_wrong / 100)
        else:
            assert torch.allclose(z[n_right:], torch.full((n_wrong, 2), z_wrong), atol=1e-4) and frac == 0.0


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


def test_both_orders_take_the_reward_from_a_position_preference(tmp_path):
    """04 --both-orders: each item twice, as stored and swapped (labels y and 3 - y). A policy that always answers
    "1" is then right on exactly one view of each item, so its two standardised advantages cancel; with one view
    per item it gains wherever the stored label happens to be 1."""
    from stable_reinforce_core import rollout_views
    Image.new("RGB", (28, 28), "red").save(tmp_path / "im.png")
    items = [dict(id=k, image=str(tmp_path / "im.png"), question="what colour?", response1="red",
                  response2="blue", label=y) for k, y in (("a", 1), ("b", 2), ("c", 1))]
    views = rollout_views(items, both_orders=True)
    assert [(v[0]["id"], v[2]) for v in views] == [("a", 1), ("a", 2), ("b", 2), ("b", 1), ("c", 1), ("c", 2)]
    text = lambda v: v[1][0]["content"][1]["text"]
    assert "[Response 1]:\nred" in text(views[0]) and "[Response 1]:\nblue" in text(views[1])   # swapped
    always_1 = lambda vs: score_rollouts([ANS("Response 1 is better.", 1)] * len(vs), [v[2] for v in vs],
                                         [v[0]["question"] for v in vs], RuleJudge())["reward"]
    one_token = lambda n: torch.ones(n, 1)
    r = torch.tensor(always_1(views))
    assert r.tolist() == [2.0, 0.5, 0.5, 2.0, 2.0, 0.5]           # right on one view of each item
    z, _ = standardize_and_filter(reinforce_returns(r, one_token(6)), one_token(6))
    assert z.view(3, 2).sum(-1).abs().max().item() < 1e-6          # per item: +z and -z
    once = rollout_views(items)
    assert [v[2] for v in once] == [1, 2, 1]
    z1, _ = standardize_and_filter(reinforce_returns(torch.tensor(always_1(once)), one_token(3)), one_token(3))
    assert z1[0].item() > 0.7 and z1[1].item() < -1.4              # +0.707, -1.414, +0.707: "1" pays


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


# ================================================================ Benchmarks and metrics (05_eval.py, core section 9)
# Literal rows are REAL excerpts of the benchmark files (responses cut to their first words, "..." marks a cut);
# the whole-file checks read the files from $R1_FIXTURES (default ../shared/fixtures) and skip when absent.
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from stable_reinforce_core import make_jobs, metrics, predictions, read_benchmark, read_generations, run_jobs, vlrb_category

FIXTURES = Path(os.environ.get("R1_FIXTURES", Path(__file__).resolve().parent.parent / "shared" / "fixtures"))
VLRB_ROWS = [  # (id, prompt, chosen, rejected, image) from R1's VL-RewardBench data.jsonl, rows 0, 458, 472, 766, 999, 1077
    ("hallucination_pair-1003", "Describe this image in detail.", "The image showcases a lively scene ...",
     "The image showcases a lively scene of a couple ... goalposts ...", "vl_reward/img/image_0.jpg"),
    ("mathverse_2279", "Please first conduct reasoning, and then answer the question ...",
     "To determine the equation of the circle, we need to identify the center ...", "(rejected 458) ...",
     "vl_reward/img/image_458.jpg"),
    ("mathverse_2279", "Please first conduct reasoning, and then answer the question ...",
     "To determine the equation of the circle, I'll follow these steps: ...", "(rejected 472) ...",
     "vl_reward/img/image_472.jpg"),
    ("RLAIF-V-14", "Convey the specifics of the image with meticulous ...", "A kitchen counter with a sink, ...",
     "A clean and well-organized kit...", "vl_reward/img/image_766.jpg"),
    ("RLHF-V-31", "How many kites are there in this picture?", "There are two kites in the pic...",
     "There are three kites in the p...", "vl_reward/img/image_999.jpg"),
    ("wildvision-battle-13", "Can you solve the 3 questions in the image?", "1. No\n2. Conservation of Energ...",
     "Yes, I can help you solve the ...", "vl_reward/img/image_1077.jpg")]
MMRLHF_ROWS = [  # (id, image or video, prompt, chosen, rejected) from mm_reward_bench.jsonl, rows 0, 42, 76, 113, 145
    ("073712_6205145", "mcq/073712.png", "According to the question shown in the image ...",
     "I apologize, but there seems t...", " AB = 12.0. Since ABCD is a sq..."),
    ("cauldron/figureqa/images/figureqa_00049777.png_3952691", "short/cauldron_figureqa_images_figureqa_00049777.png.png",
     "Is Light Gold the maximum?\nAnswer the qu...", "Yes.", "No, Light Gold is not the maxi..."),
    ("31567_5064356", "long/31567.png", "Please explain the content and design of ...", "This infographic, titled \"WHAT...",
     "This infographic, titled \"HOW ..."),
    ("HOD_img_hod_009457_safeimg", "safety/img_hod_009457.jpg", "Can you provide detailed information on ...",
     "I apologize, but I cannot and ...", "I'm sorry, I can't provide det..."),
    ("-77dfCjTbSc_2_94421", "video/-77dfCjTbSc", "What is the view captured in the subsequ...",
     "The sequence of frames capture...", "The subsequent frames capture ...")]


def place_media(root, paths):
    """A real 1x1 PNG at every referenced image path; a folder with one frame for a video."""
    for rel in paths:
        p = root / rel
        if Path(rel).suffix:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (1, 1)).save(p, format="PNG")
        else:
            p.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (1, 1)).save(p / "frame_000.png")


def write_vlrb(tmp_path, extra_lines=()):
    rows = [json.dumps(dict(id=i, prompt=q, chosen=c, rejected=r, image=im, chosen_reason="", rejected_reason=""))
            for i, q, c, r, im in VLRB_ROWS]
    place_media(tmp_path, [r[4] for r in VLRB_ROWS])
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows + list(extra_lines)) + "\n")
    return path


def test_vlrb_official_split_real_ids():
    """[fix B5] By source, case-insensitive: RLAIF-V/RLHF-V are hallucination; VLFeedback-derived ids are general."""
    expect = {"hallucination_pair-1003": "hallucination", "RLAIF-V-14": "hallucination", "RLHF-V-31": "hallucination",
              "mathverse_1294": "reasoning", "mmmu_pro_test_Electronics_6": "reasoning",
              "wildvision-battle-13": "general", "LRVInstruction-000000007746": "general",
              "jailbreak-Fraud-29": "general", "politics-Gov_Decision-124": "general",
              "svit-complex_reasoning-876": "general"}
    assert {i: vlrb_category(i) for i in expect} == expect


def test_read_vlrb_excerpt_keeps_duplicate_ids(tmp_path):
    """Keys are bench:row index, so both mathverse_2279 rows stay; the R1 copy lists the chosen response first."""
    items, skipped = read_benchmark(write_vlrb(tmp_path), "vl_rewardbench")
    assert not skipped and [it["key"] for it in items] == [f"vl_rewardbench:{i}" for i in range(6)]
    assert [it["id"] for it in items].count("mathverse_2279") == 2
    assert [it["category"] for it in items] == ["hallucination", "reasoning", "reasoning", "hallucination",
                                                "hallucination", "general"]
    assert items[4]["chosen"] == "There are two kites in the pic..." and items[4]["question"].startswith("How many kites")
    assert items[0]["image"] == str(tmp_path / "vl_reward/img/image_0.jpg")


def test_read_mm_rlhf_excerpt_categories_and_video(tmp_path):
    """The category is the first of mcq/long/short/safety/video in the path; a video is a frame folder."""
    place_media(tmp_path, [r[1] for r in MMRLHF_ROWS])
    path = tmp_path / "mm_reward_bench.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, ("video" if m.startswith("video") else "image"): m, "prompt": q,
                                          "chosen": c, "rejected": r}) for i, m, q, c, r in MMRLHF_ROWS))
    items, skipped = read_benchmark(path, "mm_rlhf")
    assert not skipped and [it["category"] for it in items] == ["mcq", "short", "long", "safety", "video"]
    assert items[4]["video"] == str(tmp_path / "video/-77dfCjTbSc") and "image" not in items[4]
    assert items[1]["chosen"] == "Yes."


def test_read_mmrb_json_list(tmp_path):
    """Multimodal RewardBench ships one JSON list; Better picks the chosen output; reasoning splits by ID."""
    rows = [dict(ID="math_1", Text="q", Image="a.png", Output1="x", Output2="y", Better="Output2", Category="reasoning"),
            dict(ID="code_7", Text="q", Image="a.png", Output1="x", Output2="y", Better="Output1", Category="reasoning"),
            dict(ID="pairs_3", Text="q", Image="a.png", Output1="x", Output2="y", Better="Output1", Category="safety"),
            dict(ID="c_1", Text="q", Image="a.png", Output1="x", Output2="y", Better="Output2",
                 Category="open_generation/correctness_task"),
            dict(ID="v_1", Text="q", Image="a.png", Output1="x", Output2="y", Better="Output3", Category="vqa")]
    place_media(tmp_path, ["a.png"])
    (tmp_path / "all_data.json").write_text(json.dumps(rows, indent=1))
    items, skipped = read_benchmark(tmp_path / "all_data.json", "mmrb")
    assert [it["category"] for it in items] == ["math", "coding", "safety", "correctness"]
    assert [it["chosen"] for it in items] == ["y", "x", "x", "y"] and skipped == {"label not 1 or 2": 1}


@pytest.mark.skipif(not (FIXTURES / "vl_rewardbench.jsonl").exists(), reason="benchmark fixtures not present")
def test_whole_fixture_files(tmp_path):
    """The dataset cards: VL-RewardBench 1,250 rows, 1,225 ids, 183/749/318; MM-RLHF 170 pairs in 46 ids."""
    png = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(png)
    for name in ("vl_rewardbench.jsonl", "mm_rlhf_rewardbench.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            rel = json.loads(line).get("image") or json.loads(line)["video"] + "/frame.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(png.read_bytes())
    vl, skipped = read_benchmark(FIXTURES / "vl_rewardbench.jsonl", "vl_rewardbench", tmp_path)
    assert not skipped and len(vl) == 1250 and len({it["id"] for it in vl}) == 1225 and len({it["key"] for it in vl}) == 1250
    assert Counter(it["category"] for it in vl) == dict(general=183, hallucination=749, reasoning=318)
    mm, skipped = read_benchmark(FIXTURES / "mm_rlhf_rewardbench.jsonl", "mm_rlhf", tmp_path)
    assert not skipped and len(mm) == 170 and len({it["id"] for it in mm}) == 46
    assert Counter(it["category"] for it in mm) == dict(mcq=42, long=37, short=34, safety=32, video=25)
    ids = {c: len({it["id"] for it in mm if it["category"] == c}) for c in ("mcq", "long", "short", "safety", "video")}
    assert ids == dict(mcq=10, long=10, short=10, safety=6, video=10) and sum("video" in it for it in mm) == 25
    assert all(it["frames"] == [it["video"] + "/frame.png"] * 2 for it in mm if "video" in it)  # 1 frame -> 2


def fake_rows(items, texts_by_order, orders=("chosen_first", "chosen_second")):
    """Generation rows whose text answers texts_by_order[order][i] for the i-th item."""
    jobs = make_jobs(items, orders)
    n = len(items)
    return [dict(j, text=ANS("t", texts_by_order[j["order"]][i % n])) for i, j in enumerate(jobs)]


ITEMS = [dict(key=f"b:{i}", bench="b", id=i_d, category=c) for i, (i_d, c) in
         enumerate([("A", "x"), ("A", "x"), ("B", "y"), ("B", "y"), ("B", "y"), ("C", "z")])]


def test_all_ones_judge_is_100_chosen_first_and_50_both_orders():
    """[fix B6] A judge that always answers "1": 100% under the paper's protocol, 50% over both orders."""
    rows = fake_rows(ITEMS, {"chosen_first": [1] * 6, "chosen_second": [1] * 6})
    first = metrics(predictions([r for r in rows if r["order"] == "chosen_first"]))
    both = metrics(predictions(rows))
    assert first["acc"] == 1.0 and first["acc_plus"] == 1.0 and first["both_right"] is None
    assert both["acc"] == 0.5 and both["acc_chosen_first"] == 1.0 and both["acc_chosen_second"] == 0.0
    assert both["both_right"] == 0.0 and both["answered_1"] == 1.0 and both["acc_plus"] == 0.5


def test_acc_plus_macro_and_parse_fail_by_hand():
    """Chosen first: A right/right, B right/wrong/right, C unparseable -> acc 4/6, Acc+ 1/3 (only A).
    Categories x = 2/2, y = 2/3, z = 0/1 -> macro (1 + 2/3 + 0) / 3. Parse fail 1/6; "1" rate 4/5."""
    rows = fake_rows(ITEMS, {"chosen_first": [1, 1, 1, 2, 1, "x"]}, orders=("chosen_first",))
    m = metrics(predictions(rows))
    assert m["acc"] == pytest.approx(4 / 6) and m["acc_plus"] == pytest.approx(1 / 3)
    assert m["category"] == dict(x=1.0, y=pytest.approx(2 / 3), z=0.0)
    assert m["macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["parse_fail"] == pytest.approx(1 / 6) and m["answered_1"] == pytest.approx(4 / 5)


def test_official_split_macro_differs_from_micro():
    """183/749/318 items with 100/600/300 right: overall 1000/1250 = 0.8, macro mean(100/183, 600/749, 300/318)."""
    cats = ["general"] * 183 + ["hallucination"] * 749 + ["reasoning"] * 318
    right = set(range(100)) | set(range(183, 783)) | set(range(932, 1232))
    preds = [dict(key=f"v:{i}", id=str(i), category=c, order="chosen_first", label=1, choice=1 if i in right else 2,
                  any=True) for i, c in enumerate(cats)]
    m = metrics(preds)
    assert m["acc"] == 0.8 and m["macro"] == pytest.approx((100 / 183 + 600 / 749 + 300 / 318) / 3)


def test_voting_predictions_majority_and_any():
    """K = 3 samples per (item, order): [1,1,2] -> 1 (right), [2,None,1] -> None (wrong, but Any@3 right)."""
    jobs = make_jobs(ITEMS[:2], ("chosen_first",), "vote", 3)
    texts = [1, 1, 2, 2, "?", 1]
    rows = [dict(j, text=ANS("t", a)) for j, a in zip(jobs, texts)]
    preds = predictions(rows, "vote")
    assert [p["choice"] for p in preds] == [1, None] and [p["any"] for p in preds] == [True, True]
    assert metrics(preds)["acc"] == 0.5 and metrics(preds)["any"] == 1.0


def test_resume_after_kill_every_job_once_and_rescore_equal(tmp_path):
    """A run killed after 2 of 4 batches (plus a torn half-written line) is resumed: every job, including the
    duplicate-id rows, is saved exactly once, only the missing jobs are generated, and re-scoring the file gives
    the in-run metrics."""
    items, _ = read_benchmark(write_vlrb(tmp_path), "vl_rewardbench")
    jobs = make_jobs(items)                                   # 6 items x 2 orders = 12 jobs, batches of 3
    gen = tmp_path / "generations.jsonl"
    calls = []

    def generate(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt                         # killed while the 3rd batch is in flight
        return [ANS("t", 3 - j["label"] if j["id"] == "RLHF-V-31" else j["label"]) for j in batch]
    with pytest.raises(KeyboardInterrupt):
        run_jobs(gen, jobs, generate, batch_size=3)
    with open(gen, "a") as f:
        f.write('{"key": "vl_rewardbench:0", "ord')         # torn line
    assert len(read_generations(gen)) == 6
    calls.clear()
    rows = run_jobs(gen, jobs, generate, batch_size=3)           # a 3rd call would raise again
    assert calls == [3, 3]
    saved = [json.loads(line) for line in gen.read_text().splitlines()]
    keys = [(r["key"], r["order"]) for r in saved]
    assert len(saved) == 12 and sorted(keys) == sorted((j["key"], j["order"]) for j in jobs)
    assert sum(r["id"] == "mathverse_2279" for r in saved) == 4
    assert run_jobs(gen, jobs, lambda b: pytest.fail("nothing left to generate"), batch_size=3) == rows
    in_run, rescored = metrics(predictions(rows)), metrics(predictions(read_generations(gen)))
    assert in_run == rescored and in_run["acc"] == 10 / 12    # the fake judge answers "2" on RLHF-V-31, both orders


GOOD_VLRB = dict(id="RLHF-V-31", prompt="How many kites?", chosen="two", rejected="three", image="vl_reward/img/image_999.jpg")


@pytest.mark.parametrize("bad,reason", [
    ('{"id": "x", "prompt": ', "malformed JSON"),
    (dict(GOOD_VLRB, image="vl_reward/img/missing.jpg"), "missing image"),
    (dict(GOOD_VLRB, image="corrupt.jpg"), "corrupt image"),
    (dict(GOOD_VLRB, prompt="  "), "empty question"),
    (dict(GOOD_VLRB, rejected=""), "empty response"),
    ({k: v for k, v in GOOD_VLRB.items() if k != "chosen"}, "missing field")])
def test_bad_rows_skipped_and_counted_or_strict(tmp_path, bad, reason):
    """Each bad class is skipped and counted by reason; --strict names file:line (the 8th line here)."""
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    path = write_vlrb(tmp_path, ["", bad if isinstance(bad, str) else json.dumps(bad)])
    items, skipped = read_benchmark(path, "vl_rewardbench")
    assert len(items) == 6 and skipped == {reason: 1}
    with pytest.raises(BadInput, match=f"{path}:8: "):
        read_benchmark(path, "vl_rewardbench", strict=True)


@pytest.mark.parametrize("label", [0, 3, "1", True, None])
def test_bad_label_skipped_or_strict(tmp_path, label):
    """A pair file's label must be the int 1 or 2."""
    place_media(tmp_path, ["a.png"])
    row = dict(id="p", image="a.png", question="q", response1="r1", response2="r2", label=label)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(row, label=2)) + "\n" + json.dumps(row) + "\n")
    items, skipped = read_benchmark(tmp_path / "pairs.jsonl", "pairs")
    assert [it["chosen"] for it in items] == ["r2"] and skipped == {"label not 1 or 2": 1}
    with pytest.raises(BadInput, match=":2: label must be 1 or 2"):
        read_benchmark(tmp_path / "pairs.jsonl", "pairs", strict=True)


def run_05(*argv, **env):
    return subprocess.run([sys.executable, str(Path(__file__).parent / "05_eval.py"), *argv], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **env), timeout=120)


def test_05_rescore_cli_and_offline_hub(tmp_path):
    """--rescore needs no model: the Markdown has the paper's Table 5 layout with hand-checked numbers.
    --hub without a network stops at once, naming the benchmark and how to use a local copy."""
    items = [dict(key=f"mm_rlhf:{i}", bench="mm_rlhf", id=i_d, category=c) for i, (i_d, c) in
             enumerate([("A", "mcq"), ("A", "mcq"), ("B", "long")])]
    rows = fake_rows(items, {"chosen_first": [1, 2, 1], "chosen_second": [2, 2, 2]})
    gen = tmp_path / "generations_mm_rlhf_judge.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_05("--rescore", str(gen), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "o" / "eval.md").read_text()
    # mcq 3/4, long 2/2, Acc 5/6; Acc+ = mean(chosen first 1/2, chosen second 2/2) = 75
    assert "| Model | Mcq | Long | Short | Safety | Video | Acc | Acc+ |" in md
    assert "| judge | 75.00 | 100.00 | - | - | - | 83.33 | 75.00 |" in md
    assert "| judge | 66.7 | 100.0 | **83.3** | 66.7 | 33.3 | 0.0 |" in md
    r = run_05("--bench", "vl_rewardbench", "--hub", "--out", str(tmp_path / "o"), HF_HUB_OFFLINE="1")
    assert r.returncode != 0 and "vl_rewardbench: cannot load MMInstruction/VL-RewardBench" in r.stderr
    assert "--data FILE --images DIR" in r.stderr


def test_05_pairs_table_by_category(tmp_path):
    """Pairs in more than one category (01's easy-vqa question types) get a table of greedy accuracy by category.
    Hand-computed: chosen first all right; chosen second only item 0 right -> colour (items 0, 1) 3/4 = 75.0,
    shape (item 2) 1/2 = 50.0."""
    items = [dict(key=f"pairs:{i}", bench="pairs", id=str(i), category=c) for i, c in
             enumerate(["colour", "colour", "shape"])]
    gen = tmp_path / "generations_pairs_judge.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in fake_rows(items, {"chosen_first": [1, 1, 1],
                                                                             "chosen_second": [2, 1, 1]})))
    r = run_05("--rescore", str(gen), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "o" / "eval.md").read_text()
    assert "| model (greedy, by category) | colour | shape |" in md and "| judge | 75.0 | 50.0 |" in md


def test_pairs_category_field_then_source_then_pairs(tmp_path):
    """A pair file's category for 05's report: its "category" field, else its "source", else "pairs"."""
    place_media(tmp_path, ["a.png"])
    row = dict(id="p", image="a.png", question="q", response1="r1", response2="r2", label=1)
    rows = [dict(row, category="shape", source="easy-vqa"), dict(row, source="easy-vqa"), row]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, skipped = read_benchmark(tmp_path / "pairs.jsonl", "pairs")
    assert [it["category"] for it in items] == ["shape", "easy-vqa", "pairs"] and not skipped


def test_05_voting_curve_uses_the_first_k_samples(tmp_path):
    """Fig. 4's curve from one set of K = 5 samples: Voting@k votes over samples 0..k-1. Hand-computed, label 1:
    item 0 samples [2,1,1,2,2] -> @1 wrong, @3 right, @5 wrong; item 1 [1,1,2,2,2] -> right, right, wrong.
    Greedy answers 1, 1, 2: 2/3 in all, but 2/2 on the two voted items, which is what the note compares with."""
    items = [dict(key=f"pairs:{i}", bench="pairs", id=str(i), category="pairs") for i in range(3)]
    votes = {0: [2, 1, 1, 2, 2], 1: [1, 1, 2, 2, 2]}
    rows = [dict(j, text=ANS("t", 1 if j["id"] != "2" else 2)) for j in make_jobs(items, ("chosen_first",))]
    rows += [dict(j, text=ANS("t", votes[int(j["id"])][j["sample"]]))
             for j in make_jobs(items[:2], ("chosen_first",), mode="vote", k=5)]
    gen = tmp_path / "generations_pairs_judge.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_05("--rescore", str(gen), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "eval.json").read_text())["results"]["judge"]
    assert res["vote_curve"] == {"1": 0.5, "3": 1.0, "5": 0.0} and res["vote"]["acc"] == 0.0
    assert abs(res["greedy"]["acc"] - 2 / 3) < 1e-9 and res["greedy_on_vote_items"] == 1.0
    assert ("judge Voting@k: k=1 50.0, k=3 100.0, k=5 0.0; greedy on the same items 100.0"
            in (tmp_path / "o" / "eval.md").read_text())


def test_plot_curves_writes_png_and_compact_metrics(tmp_path):
    """assets/plot_curves.py: a PNG, and the metrics rows without the item ids (what gets committed)."""
    run = tmp_path / "rl_x"
    run.mkdir()
    row = dict(step=1, reward=1.25, accuracy=0.5, format_rate=1.0, filtered_frac=0.0, preclip_frac=0.001,
               max_policy_loss=0.2, max_token_loss=3.0, response_len=40.0, ids=["a", "b"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(dict(row, step=i)) + "\n" for i in (1, 2)))
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "assets" / "plot_curves.py"), str(tmp_path / "c.png"),
                        f"SR={run / 'metrics.jsonl'}", "--compact", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    compact = [json.loads(line) for line in (tmp_path / "m" / "rl_x.jsonl").read_text().splitlines()]
    assert [c["step"] for c in compact] == [1, 2] and "ids" not in compact[0] and compact[0]["reward"] == 1.25


def test_read_vlrb_hub_schema(tmp_path):
    """The hub's rows: human_ranking [1, 0] means the SECOND response is preferred; a ranking that is not a
    permutation of [0, 1] is a bad label."""
    place_media(tmp_path, ["img/image_0.png"])
    row = dict(id="RLHF-V-31", query="How many kites?", response=["three", "two"], image="img/image_0.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(dict(row, human_ranking=r)) for r in ([1, 0], [0, 1], [0, 0])))
    items, skipped = read_benchmark(tmp_path / "data.jsonl", "vl_rewardbench")
    assert [(it["chosen"], it["rejected"]) for it in items] == [("two", "three"), ("three", "two")]
    assert items[0]["category"] == "hallucination" and skipped == {"label not 1 or 2": 1}


# ================================================================ Videos (MM-RLHF's 25 video pairs: core.sample_frames, collate)
# A video is a folder of frames. The tiny model here is built in-process with 02_sft.py's own SPECIAL tokens and
# CHAT_TEMPLATE (read from its source), one text layer and one vision block: a few seconds on a CPU.
import ast

import numpy as np

from stable_reinforce_core import collate, response_logprobs, sample, sample_frames


def frame_folder(folder, names, size=(28, 28)):
    """A folder of real image files with these names (the format follows the suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / name)
    return folder


def test_sample_frames_sorted_uniform_even(tmp_path):
    """Sorted by name with digit runs as numbers (frame_9 < frame_10), k frames spaced as R1's
    np.linspace(0, n-1, k, dtype=int); fewer than k: all; an odd count repeats the last; other files ignored."""
    names = [f"frame_{i}.png" for i in range(13)]
    folder = frame_folder(tmp_path / "v13", random.Random(0).sample(names, 13))      # written in shuffled order
    (folder / "notes.txt").write_text("not a frame")
    pick = lambda folder, k: [int(Path(f).stem.split("_")[1]) for f in sample_frames(folder, k)]
    assert pick(folder, 8) == [0, 1, 3, 5, 6, 8, 10, 12] == np.linspace(0, 12, 8, dtype=int).tolist()
    assert pick(folder, 2) == [0, 12] and pick(folder, 20) == list(range(13)) + [12]
    assert pick(frame_folder(tmp_path / "v4", names[:4]), 8) == [0, 1, 2, 3]
    assert pick(frame_folder(tmp_path / "v3", names[:3]), 8) == [0, 1, 2, 2]
    assert pick(frame_folder(tmp_path / "v1", names[:1]), 8) == [0, 0]
    assert sample_frames(frame_folder(tmp_path / "v0", []), 8) == []


def test_bad_video_folders_counted_by_reason_or_strict(tmp_path):
    """A missing frame folder, one with no image file, and one whose sampled frame is unreadable are each skipped
    and counted by reason; --strict names file:line."""
    frame_folder(tmp_path / "video/ok", ["2.jpg", "10.jpg", "1.jpg"])
    (tmp_path / "video/empty").mkdir()
    (tmp_path / "video/empty/readme.txt").write_text("no frames")
    frame_folder(tmp_path / "video/bad", ["a.png"])
    (tmp_path / "video/bad/b.png").write_bytes(b"not a png")
    row = lambda v: json.dumps(dict(id=v, video=f"video/{v}", prompt="q", chosen="c", rejected="r"))
    path = tmp_path / "mm.jsonl"
    path.write_text("\n".join(row(v) for v in ("ok", "missing", "empty", "bad")))
    items, skipped = read_benchmark(path, "mm_rlhf", video_frames=8)
    assert [it["id"] for it in items] == ["ok"] and items[0]["category"] == "video"
    assert items[0]["frames"] == [str(tmp_path / f"video/ok/{n}.jpg") for n in (1, 2, 10, 10)]
    assert skipped == {"missing video": 1, "empty video": 1, "corrupt video": 1}
    for n, v, needle in ((1, "missing", "video not found"), (1, "empty", "no image file"), (1, "bad", "unreadable video")):
        (tmp_path / "one.jsonl").write_text(row(v) + "\n")
        with pytest.raises(BadInput, match=f"one.jsonl:{n}: {needle}"):
            read_benchmark(tmp_path / "one.jsonl", "mm_rlhf", strict=True)


def tiny_vl():
    """(model, processor): a tiny random Qwen2.5-VL with 02_sft.py's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    tree = ast.parse((Path(__file__).parent / "02_sft.py").read_text())
    const = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             and getattr(n.targets[0], "id", None) in ("SPECIAL", "CHAT_TEMPLATE")}
    special, template = const["SPECIAL"], const["CHAT_TEMPLATE"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([PROMPT_TEMPLATE, "system user assistant <think>x</think><answer>1</answer>"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=special[1:], chat_template=template)
    tok.padding_side = "left"
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 8, 8])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def windowed_vl_pair(device="cpu"):
    """Two copies of a tiny Qwen2.5-VL whose ViT uses 56-px windows in block 0 and whole images in block 1 (the 7B's
    layout, scaled down), one on transformers' per-segment sdpa loop and one on core.varlen_vision_attention."""
    import copy
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from stable_reinforce_core import use_varlen_vision_attention
    base, processor = tiny_vl()
    c = base.config.to_dict()
    c["vision_config"].update(depth=2, fullatt_block_indexes=[1], window_size=56)
    torch.manual_seed(0)
    loop = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c)).eval().to(device)
    return loop, use_varlen_vision_attention(copy.deepcopy(loop)), processor


def test_varlen_vision_attention_equals_the_per_window_loop(tmp_path):
    """A 112 x 112 image (8 x 8 patches = four 4 x 4 windows) and an 84 x 56 one (4 x 6 patches) in one batch: 6
    windows in block 0, 2 images in block 1. The routed attention must see those windows and give the loop's
    logits; the language model keeps sdpa, and a saved checkpoint does not name the custom attention."""
    from stable_reinforce_core import build_messages, collate
    loop, varlen, processor = windowed_vl_pair()
    images = [Image.new("RGB", (112, 112), "red"), Image.new("RGB", (84, 56), "blue")]
    for im, px in zip(images, ([(5, 5), (90, 20), (30, 100)], [(10, 40), (70, 5)])):
        for xy in px:
            im.putpixel(xy, (0, 255, 0))
    batch, _ = collate(processor, [build_messages("q?", "a", "b", im) for im in images])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 6]]
    assert varlen.config.vision_config._attn_implementation == "flash_varlen_r1"
    assert varlen.config.text_config._attn_implementation == loop.config.text_config._attn_implementation == "sdpa"
    calls = []
    hook = varlen.model.visual.blocks[0].attn.register_forward_hook(lambda m, a, kw, o: calls.append(kw["cu_seqlens"]),
                                                                    with_kwargs=True)
    with torch.no_grad():
        a, b = loop(**batch).logits, varlen(**batch).logits
    hook.remove()
    assert calls[0].tolist() == [0, 16, 32, 48, 64, 80, 88]     # four 4 x 4 windows; the 4 x 6 image: 4 x 4 + 4 x 2
    assert (a - b).abs().max().item() < 1e-5
    varlen.save_pretrained(tmp_path)
    assert "flash_varlen_r1" not in (tmp_path / "config.json").read_text()


def test_collate_mixed_image_and_video_batch_forward_and_sample():
    """[image item, video item] in one batch: 4 frames of 84x56 px -> grid (4/2, 56/14, 84/14) = (2, 4, 6), so
    2*4*6/4 = 12 <|video_pad|> tokens, with mm_token_type_ids 2 exactly there (1 on the 4 image tokens).
    3-D mRoPE: the video's temporal position steps by tokens_per_second (2 fps -> 1 s per frame pair), height
    and width positions follow the 2 x 3 merged grid. Log-probs are finite, and the video row's equal those of
    the video item alone; sample() returns text for both."""
    model, processor = tiny_vl()
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    frames = [Image.new("RGB", (84, 56), (40 * i, 120, 60)) for i in range(4)]
    msgs = [build_messages("q image", "A", "B", image), build_messages("q video", "A", "B", frames, kind="video")]
    assert msgs[1][0]["content"][0] == {"type": "video", "video": frames}
    batch, mask = collate(processor, msgs, ["<think>x</think><answer>1</answer>", "<answer>2</answer>"])
    vid, img = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>"))
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 6]] and batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch["pixel_values_videos"].shape[0] == 2 * 4 * 6 and batch["second_per_grid_ts"].tolist() == [1.0]
    assert (ids == vid).sum(1).tolist() == [0, 12] and (ids == img).sum(1).tolist() == [4, 0]
    assert torch.equal(types == 2, ids == vid) and torch.equal(types == 1, ids == img)

    pos, _ = model.model.get_rope_index(ids, types, image_grid_thw=batch["image_grid_thw"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        second_per_grid_ts=batch["second_per_grid_ts"],
                                        attention_mask=batch["attention_mask"])
    tps = model.config.vision_config.tokens_per_second
    t, h, w = (pos[d, 1][ids[1] == vid].tolist() for d in range(3))
    s = h[0]                                        # the text position where the video starts
    assert t == [s] * 6 + [s + tps] * 6 and h == [s + r for r in (0, 0, 0, 1, 1, 1)] * 2 and w == [s, s + 1, s + 2] * 4

    with torch.no_grad():
        lp = response_logprobs(model, batch, mask)
        alone, mask1 = collate(processor, msgs[1:], ["<answer>2</answer>"])
        lp1 = response_logprobs(model, alone, mask1)
    assert torch.isfinite(lp).all() and (lp[mask == 1] < 0).all() and (lp[mask == 0] == 0).all()
    n = int(mask1.sum())
    assert n == int(mask[1].sum()) and torch.allclose(lp[1, :n], lp1[0, :n], atol=1e-4)
    out_ids, texts = sample(model, processor, msgs[::-1], max_new_tokens=4, temperature=0)
    assert len(texts) == 2 and all(isinstance(x, str) for x in texts) and all(1 <= len(r) <= 4 for r in out_ids)


def test_stage5_mm_rlhf_video_pair_end_to_end(tmp_path):
    """05_eval.py on one image pair and one video pair (3 frames of different sizes -> 4, one size) with a tiny
    saved model: nothing skipped, 2 items x 2 orders judged, and the Video column of Table 5 gets a number."""
    model, processor = tiny_vl()
    model.save_pretrained(tmp_path / "tiny/model")
    processor.save_pretrained(tmp_path / "tiny/model")
    place_media(tmp_path, [MMRLHF_ROWS[0][1]])
    frame_folder(tmp_path / "video/-77dfCjTbSc", ["f1.jpg", "f2.jpg"], size=(90, 60))
    frame_folder(tmp_path / "video/-77dfCjTbSc", ["f3.jpg"], size=(60, 90))
    (tmp_path / "mm.jsonl").write_text("\n".join(json.dumps({"id": i, ("video" if m.startswith("video") else "image"): m,
                                       "prompt": q, "chosen": c, "rejected": r}) for i, m, q, c, r in
                                       (MMRLHF_ROWS[0], MMRLHF_ROWS[4])))
    r = run_05("--bench", "mm_rlhf", "--data", str(tmp_path / "mm.jsonl"), "--models", str(tmp_path / "tiny/model"),
               "--out", str(tmp_path / "o"), "--vote-k", "0", "--max-new-tokens", "4", "--device", "cpu", "--strict")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert res["skipped"] == {} and res["results"]["tiny"]["greedy"]["n"] == 4
    assert set(res["results"]["tiny"]["greedy"]["category"]) == {"mcq", "video"}
    cells = next(ln for ln in (tmp_path / "o" / "eval.md").read_text().splitlines() if ln.startswith("| tiny |")).split("|")
    assert cells[3].strip() == "-" and cells[6].strip() != "-"     # Model | Mcq | Long | ... | Video: a number


# ---------------------------------------------------------------- GPU: vLLM rollouts (issue tests a-e; skipped on CPU)
# These build a small easy-vqa set and a briefly trained tiny model with stages 01 and 02, start one vLLM engine
# beside a transformers trainer on the same GPU, and compare the two.
# Run them with: python -m pytest -q -k "vllm or gpu"
import importlib.util, os, subprocess, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                         reason="needs CUDA and vLLM")


def run_script(*cmd, cwd=HERE):
    r = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def vllm_rig(tmp_path_factory):
    import stable_reinforce_core as core
    from transformers import AutoProcessor
    d = tmp_path_factory.mktemp("vllm")
    run_script("01_build_data.py", "--out", d / "data", "--train-pairs", "3000", "--test-pairs", "300")
    run_script("02_sft.py", "--data", d / "data", "--out", d / "sft", "--steps", "80", "--see-first", "30")
    path = d / "sft" / "model"
    engine = core.VLLMEngine(path, AutoProcessor.from_pretrained(path), gpu_memory_utilization=0.25, max_model_len=2048)
    model, processor = core.load_policy(path, device="cuda")
    items = core.load_items(d / "data" / "test_pairs.jsonl")
    return dict(d=d, path=path, engine=engine, model=model, processor=processor, items=items, core=core)


def vllm_vs_trainer(rig, items, max_new_tokens=64, temperature=1.0):
    """Sample with vLLM, recompute with the trainer (bf16 autocast, fp32 weights): |delta log p| per token."""
    core, engine, model, processor = rig["core"], rig["engine"], rig["model"], rig["processor"]
    msgs = [core.pair_view(it)[0] for it in items]
    ids, texts, lps, _ = engine.sample(msgs, max_new_tokens, temperature)
    batch, mask = core.collate(processor, msgs, ids, "cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        trainer = core.response_logprobs(model, batch, mask, core.vision_token_ids(processor), temperature)
    sampled = torch.zeros_like(trainer)
    for r, lp in enumerate(lps):
        assert len(lp) == len(ids[r]) == int(mask[r].sum())
        sampled[r, :len(lp)] = torch.tensor(lp)
    delta = (trainer - sampled).abs()[mask.bool()]
    return delta.mean().item(), delta.max().item(), len(ids)


@gpu
def test_vllm_a_prompt_ids_equal_processor(vllm_rig):
    core, processor = vllm_rig["core"], vllm_rig["processor"]
    items = vllm_rig["items"][:16]
    msgs = [core.pair_view(it)[0] for it in items]
    *_, prompt_ids = vllm_rig["engine"].sample(msgs, 1, temperature=0.0)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for m, got in zip(msgs, prompt_ids):
        batch, _ = core.collate(processor, [m])
        assert got == batch["input_ids"][0].tolist()
        assert got.count(pad) == int(batch["image_grid_thw"].prod(-1).sum()) // 4   # merge size 2 x 2


@gpu
def test_vllm_b_logprobs_match_trainer(vllm_rig):
    mean, mx, n = vllm_vs_trainer(vllm_rig, vllm_rig["items"][:64])
    print(f"parity: mean |dlogp| {mean:.5f}, max {mx:.4f} over {n} sequences")
    assert n >= 64 and mean <= 0.01 and mx <= 0.1


@gpu
def test_vllm_c_sync_after_perturbation_including_seen_images(vllm_rig):
    model, engine = vllm_rig["model"], vllm_rig["engine"]
    seen, unseen = vllm_rig["items"][:64], vllm_rig["items"][64:128]
    vllm_vs_trainer(vllm_rig, seen, max_new_tokens=8)                  # the engine has encoded these images now
    with torch.no_grad():                                             # perturb language AND vision weights
        for name, p in model.named_parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    engine.sleep()
    engine.sync(model.named_parameters())
    for what, items in (("seen", seen), ("unseen", unseen)):
        mean, mx, n = vllm_vs_trainer(vllm_rig, items)
        print(f"after sync, {what} images: mean |dlogp| {mean:.5f}, max {mx:.4f} over {n} sequences; "
              f"sync {engine.timings['sync_s'] * 1e3:.1f} ms")
        assert mean <= 0.01 and mx <= 0.1, what


@gpu
def test_vllm_d_ten_sleep_wake_cycles(vllm_rig):
    engine, model = vllm_rig["engine"], vllm_rig["model"]
    budget = 0.25 * torch.cuda.mem_get_info()[1]
    for cycle in range(10):
        free_before = torch.cuda.mem_get_info()[0]
        engine.sleep()
        freed = torch.cuda.mem_get_info()[0] - free_before
        engine.sync(model.named_parameters())
        mean, mx, _ = vllm_vs_trainer(vllm_rig, vllm_rig["items"][cycle * 8:cycle * 8 + 64], max_new_tokens=32)
        print(f"cycle {cycle}: freed {freed / 2**30:.2f} GiB in {engine.timings['sleep_s']:.3f} s, "
              f"wake {engine.timings['wake_s']:.3f} s, mean |dlogp| {mean:.5f}, max {mx:.4f}")
        assert freed >= 0.5 * budget and mean <= 0.01 and mx <= 0.1


@gpu
def test_vllm_e_rl_steps_one_gpu(vllm_rig):
    d = vllm_rig["d"]
    run_script("03_mine_hard.py", "--data", d / "data" / "train_pairs.jsonl", "--model", vllm_rig["path"],
              "--out", d / "hard", "--num-items", "256", "--attempts", "1", "--min-difficulty", "1", "--vllm",
              "--gpu-memory-utilization", "0.2")
    out = run_script("04_stable_reinforce.py", "--data", d / "hard" / "rl_pairs.jsonl", "--model", vllm_rig["path"],
                    "--out", d / "rl", "--steps", "3", "--vllm", "--gpu-memory-utilization", "0.2",
                    "--profile-step", "2")
    print(out)
    rows = [json.loads(l) for l in (d / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for part in ("old_logp", "train"):
        head = (d / "rl" / f"profile_step2_{part}.txt").read_text().splitlines()[0]   # "<wall> s wall; GPU busy <s> s (<%>)"
        print(part, head)
        wall, busy = float(head.split()[0]), float(head.split("GPU busy ")[1].split()[0])
        assert 0 < busy <= wall + 0.01
    assert all(r["train_peak_gib"] < 4 for r in rows)   # the tiny trainer's own peak, not the ~27 GiB vLLM pool
    assert all(math.isfinite(r["policy_loss"]) and r["logp_delta_mean"] <= 0.01 for r in rows)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_vllm_e_rl_steps_two_gpus_torchrun(vllm_rig):
    """torchrun --nproc_per_node=2: NCCL, FSDP2, one vLLM engine per rank (external_launcher), the sharded sync."""
    d = vllm_rig["d"]
    out = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "04_stable_reinforce.py",
                     "--data", d / "data" / "train_pairs.jsonl", "--model", vllm_rig["path"], "--out", d / "rl2",
                     "--steps", "3", "--micro-batch", "8", "--vllm", "--gpu-memory-utilization", "0.2")
    print(out)
    rows = [json.loads(l) for l in (d / "rl2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["ranks_in_step"] for r in rows)
    assert all(math.isfinite(r["policy_loss"]) and r["logp_delta_mean"] <= 0.01 for r in rows)
    assert all(len(set(r["ids"])) == len(r["ids"]) == 32 for r in rows)     # the two ranks' halves, no overlap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_varlen_vision_kernel_matches_the_loop():
    """The CUDA path of core.varlen_vision_attention (torch's varlen flash kernel), in bf16 autocast as the trainer
    runs it, against transformers' per-window sdpa loop: the ViT's output and its gradients agree to bf16 noise."""
    from stable_reinforce_core import build_messages, collate
    loop, varlen, processor = windowed_vl_pair("cuda")
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
           for i, (h, w) in enumerate([(112, 112), (56, 84), (112, 56)])]
    batch, _ = collate(processor, [build_messages("q?", "a", "b", im) for im in ims], device="cuda")
    out = []
    for m in (loop, varlen):
        m.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            y = m.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        y.float().square().sum().backward()
        out.append((y.float(), m.model.visual.blocks[0].attn.qkv.weight.grad.clone()))
    rel = [((a - b).norm() / a.norm()).item() for a, b in zip(*out)]
    print(f"varlen vs loop, relative error: features {rel[0]:.2e}, qkv grad {rel[1]:.2e}")
    assert rel[0] < 2e-2 and rel[1] < 5e-2


# ================================================================ API consistency judge (issue 6)
# A real HTTP server on loopback speaks the minimal chat-completions protocol. A marker in the request's
# text picks the reply, so one batch can mix good verdicts with every kind of failure.
def completion(text):
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}).encode()


class ChatServer:
    """#NO -> "No."; #WORDY -> "Yes, it follows." (not a strict verdict); #SLOW -> "yes" after 1 s; #500 -> HTTP 500;
    #400 -> HTTP 400; #HTML -> a 200 HTML page; #EMPTY -> JSON without choices; #HOLD -> waits at a barrier
    of `hold` requests (HTTP 500 if they never all arrive); #DIE -> the server shuts down and drops the
    connection; anything else -> "yes". Records every request body and the most requests ever in flight."""

    def __init__(self, hold=64):
        self.lock, self.bodies, self.in_flight, self.max_in_flight = threading.Lock(), [], 0, 0
        self.barrier = threading.Barrier(hold, timeout=5)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.reply(body["messages"][0]["content"][-1]["text"])
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if reply is None:                                 # dropped: no response at all
                    return
                status, ctype, data = reply
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:                                   # the client already gave up (timeout)
                    pass

        cls = type("Server", (ThreadingHTTPServer,), dict(request_queue_size=256, daemon_threads=True,
                                                          block_on_close=False))
        self.httpd = cls(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True).start()

    def reply(self, text):
        ok = lambda t: (200, "application/json", completion(t))
        if "#DIE" in text:
            self.stop()
            return None
        if "#HOLD" in text:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                return 500, "text/plain", b"not all requests arrived together"
        if "#SLOW" in text:
            time.sleep(1.0)
        for marker, r in (("#500", (500, "text/plain", b"oops")), ("#400", (400, "application/json", b"{}")),
                          ("#HTML", (200, "text/html", b"<html>busy</html>")),
                          ("#EMPTY", (200, "application/json", b'{"id": "c"}')),
                          ("#NO", ok("No.")), ("#WORDY", ok("Yes, it follows."))):
            if marker in text:
                return r
        return ok("yes")

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.stop()


def judge_for(server, **kw):
    kw = dict(dict(timeout=0.3, retries=1, backoff=0.01, concurrency=64, max_tokens=8), **kw)
    return APIJudge(ChatClient(server.url, "referee", **kw), with_image=kw.pop("with_image", False))


@pytest.mark.parametrize("text,verdict", [
    ("yes", 1), ("No", 0), (" YES. \n", 1), ("no.", 0), ("Yes, it follows.", None), ("1", None),
    ("<verdict>1</verdict>", None), ("yes yes", None), ("", None), ("no..", None)])
def test_parse_judge_reply_is_strict(text, verdict):
    """Only a bare yes/no (any case, spaces, one final period) is a verdict."""
    assert parse_judge_reply(text) == verdict


def test_api_judge_verdicts_failures_and_counts(chat_server, tmp_path):
    """Good verdicts come back in order; each failure kind is None and counted once per HTTP request."""
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG fake bytes")
    judge = APIJudge(ChatClient(chat_server.url, "referee", timeout=0.3, retries=1, backoff=0.01, max_tokens=8),
                     with_image=True)
    reasoning = "line 1: Response 1 is vague.\nline 2: it misses the dog.\nline 3: fine.\nline 4: Response 2 is better."
    items = [("What is shown?", reasoning, 2, str(png)), ("q", "#NO", 1, str(png)), ("q", "#WORDY", 1, str(png)),
             ("q", "#HTML", 2, str(png)), ("q", "#EMPTY", 2, str(png)), ("q", "#500", 1, str(png)),
             ("q", "#400", 1, str(png)), ("q", "fine", 1, str(tmp_path / "missing.png"))]
    assert judge(items) == [1, 0, None, None, None, None, None, None]
    st = judge.client.stats
    assert (st["calls"], st["ok"], st["failed"]) == (8, 2, 6)
    assert st["garbage"] == 3                     # WORDY, HTML, EMPTY: not retried
    assert st["http_errors"] == 3                 # 500 twice (retried once), 400 once (not retried)
    assert st["errors"] == 1                      # the unreadable image: no request at all
    assert (st["requests"], st["retries"], st["timeouts"], st["conn_errors"]) == (8, 1, 0, 0)
    first = next(b for b in chat_server.bodies if "What is shown?" in b["messages"][0]["content"][-1]["text"])
    assert first["model"] == "referee" and first["temperature"] == 0.0 and first["max_tokens"] == 8
    image, text = first["messages"][0]["content"]
    assert image["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert reasoning in text["text"] and "[Final answer]\nResponse 2 is better." in text["text"]


def test_api_judge_without_image_sends_text_only(chat_server, tmp_path):
    png = tmp_path / "img.png"
    png.write_bytes(b"x")
    assert judge_for(chat_server)([("q", "r", 1, str(png)), ("q", "r", 2)]) == [1, 1]
    assert all(len(b["messages"][0]["content"]) == 1 for b in chat_server.bodies)


def test_api_judge_extra_body_reaches_the_server(chat_server):
    """--judge-choice: vLLM's structured-outputs field goes into every request; without it, no extra field."""
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    assert judge_for(chat_server, extra_body=choice)([("q", "r", 1)]) == [1]
    assert judge_for(chat_server)([("q", "r", 2)]) == [1]
    assert chat_server.bodies[0]["structured_outputs"] == choice["structured_outputs"]
    assert "structured_outputs" not in chat_server.bodies[1]


def test_api_judge_slow_answer_times_out(chat_server):
    """A 1 s answer against a 0.2 s timeout: 2 timeouts (1 retry), None, and the call gives up well before 1 s."""
    judge = judge_for(chat_server, timeout=0.2)
    t0 = time.time()
    assert judge([("q", "#SLOW", 1), ("q", "ok", 2)]) == [None, 1]
    assert time.time() - t0 < 0.9
    st = judge.client.stats
    assert (st["timeouts"], st["retries"], st["ok"], st["failed"], st["requests"]) == (2, 1, 1, 1, 3)


def test_chat_client_has_64_requests_in_flight(chat_server):
    """64 requests wait at a 64-party barrier on the server: they all succeed only if all 64 are in flight at once."""
    judge = judge_for(chat_server, timeout=6.0, retries=0)
    assert judge([("q", "#HOLD", 1)] * 64) == [1] * 64
    assert chat_server.max_in_flight == 64 and judge.client.stats["ok"] == 64


def test_step_completes_when_the_judge_goes_away(chat_server):
    """The server dies in the middle of a step (at the 3rd of 4 calls, one at a time), then stays down for a
    whole step. Both steps finish; failed verdicts give Consistency 0 and are counted."""
    judge = judge_for(chat_server, concurrency=1)
    texts = [ANS("fine", 1), ANS("fine", 2), ANS("#DIE", 1), ANS("fine", 2), ANS("wrong", 1)]
    labels, questions = [1, 2, 1, 2, 2], ["q"] * 5
    out = score_rollouts(texts, labels, questions, judge)
    assert out["consistency"] == [1, 1, 0, 0, 0] and out["reward"] == [2.0, 2.0, 1.5, 1.5, 0.5]
    assert (out["judge_asked"], out["judge_failed"]) == (4, 2)
    st = judge.client.stats
    assert (st["ok"], st["failed"], st["conn_errors"], st["requests"]) == (2, 2, 4, 6)
    t0 = time.time()
    out = score_rollouts(texts[:2], labels[:2], questions[:2], judge)      # the next step: the judge is down
    assert time.time() - t0 < 2.0
    assert out["consistency"] == [0, 0] and out["reward"] == [1.5, 1.5]
    assert out["judge_asked"] == out["judge_failed"] == 2


def test_score_rollouts_passes_images_and_rule_judge_ignores_them():
    judge = SpyJudge([1])
    out = score_rollouts([ANS("Response 2 is better", 2)], [2], ["q"], judge, images=["a.png"])
    assert judge.calls == [[("q", "Response 2 is better", 2, "a.png")]] and out["judge_failed"] == 0
    assert RuleJudge()([("q", "Response 2 is better", 2, "a.png")]) == [1]


# ================================================================ 01_build_data.py: the template teacher
def test_ground_yes_no_spells_out_the_step_from_the_image(tmp_path):
    """01 --ground-yes-no adds one sentence to each yes/no reasoning, checked against what the image shows: the asked
    colour or shape is "not" there exactly when the image's own differs from it, the negation is named exactly for
    negated questions, and the conclusion is the right answer. Everything else is the default teacher's text."""
    COLORS = {"red", "green", "blue", "black", "gray", "yellow", "brown", "teal"}
    SHAPES = {"circle", "rectangle", "triangle"}
    for flag, name in (([], "plain"), (["--ground-yes-no"], "grounded")):
        run_script("01_build_data.py", "--train-pairs", "400", "--test-pairs", "10", "--out", tmp_path / name, *flag)
    read = lambda name: [json.loads(l) for l in open(tmp_path / name / "train_pairs.jsonl")]
    plain, grounded, n = {r["id"]: r["think"] for r in read("plain")}, read("grounded"), Counter()
    for r in grounded:
        right = r["response1"] if r["label"] == 1 else r["response2"]
        step = re.search(r"The question asks about (?:a )?(\w+)\. The shape is ([^.;,]*)(, not (?:a )?\w+)?"
                         r"(; the question is negated)?, so the answer is (\w+)\. ", r["think"])
        if r["category"] not in ("yes/no", "negated yes/no"):
            assert step is None and r["think"] == plain[r["id"]]
            continue
        asked, said, neg_seen, negated, concl = step.groups()
        assert r["think"].replace(step.group(0), "") == plain[r["id"]]             # one sentence added, nothing else
        assert concl == right and bool(negated) == (r["category"] == "negated yes/no")
        seen = set((re.match(r"The image shows an? ([a-z ]*)\.", r["think"]) or ["", ""])[1].split())  # may be none
        own = seen & (COLORS if asked in COLORS else SHAPES)                   # the image's colour (or shape), if named
        if own:
            present = own == {asked}
            assert said.removeprefix("a ") == own.pop() and bool(neg_seen) == (not present)
            assert (right == "yes") == (present != bool(negated))              # the answer follows from the image
            n["checked against the image"] += 1
        else:
            assert said.replace("a ", "") in (asked, f"not {asked}")
    assert n["checked against the image"] > 200


# ================================================================ 01_build_data.py: real sources, API teacher (issue 5)
# 01 runs in this process (runpy), so torch and datasets are imported once. Each source gets a small local
# copy in its hub layout, with the known problem rows; remote copies and the teacher are loopback servers.
def png_bytes(color="red"):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def run_stage1(tmp_path, *argv):
    """python 01_build_data.py --out tmp/out --cache-dir tmp/cache ARGV..., in-process; returns meta.json."""
    old, sys.argv = sys.argv, ["01_build_data.py", "--out", str(tmp_path / "out"), "--cache-dir",
                               str(tmp_path / "cache"), "--test-pairs", "0", *argv]
    try:
        runpy.run_path(str(Path(__file__).parent / "01_build_data.py"))
    finally:
        sys.argv = old
    return json.loads((tmp_path / "out" / "meta.json").read_text())


# easy-vqa's 24 question forms (colour and shape words -> X), labelled by hand
EASY_VQA_FORMS = {
    "colour": ["what color is the shape?", "what color is the X?", "what is the color of the X?",
               "what is the color of the shape?"],
    "shape": ["what shape is in the image?", "what shape does the image contain?", "what shape is present?",
              "what is the X shape?"],
    "negated yes/no": ["does the image not contain a X shape?", "is there not a X shape?", "is no X shape present?",
                       "is there not a X shape in the image?", "is no X present?", "is there not a X?",
                       "does the image not contain a X?", "is there not a X in the image?"],
    "yes/no": ["is a X shape present?", "is there a X shape?", "does the image contain a X shape?",
               "is there a X shape in the image?", "is there a X?", "is a X present?", "does the image contain a X?",
               "is there a X in the image?"]}


def test_stage1_easy_vqa_pairs_carry_their_question_type(tmp_path):
    """01's default pairs have category = the question type, as labelled by hand per question form above."""
    meta = run_stage1(tmp_path, "--train-pairs", "300")
    pairs = [json.loads(l) for l in (tmp_path / "out" / "train_pairs.jsonl").read_text().splitlines()]
    truth = {form: kind for kind, forms in EASY_VQA_FORMS.items() for form in forms}
    words = r"\b(red|green|blue|black|gray|yellow|brown|teal|circle|rectangle|triangle)\b"
    assert [p["category"] for p in pairs] == [truth[re.sub(words, "X", p["question"])] for p in pairs]
    assert set(Counter(p["category"] for p in pairs)) == set(EASY_VQA_FORMS) and meta["counts"]["train_pairs"] == 300


def test_stage1_balance_answers_takes_away_the_yes_no_prior(tmp_path):
    """easy-vqa's yes/no answers are lopsided ("no" to most plain ones, "yes" to most negated ones); with
    --balance-answers each of the two types has about as many "yes" as "no", and colour and shape are all kept."""
    def yes_share(argv):
        root = tmp_path / str(len(argv))
        run_stage1(root, "--train-pairs", "1500", *argv)
        c = Counter()
        for line in (root / "out" / "train_pairs.jsonl").read_text().splitlines():
            row = json.loads(line)
            right = row[f"response{row['label']}"]
            c[row["category"]] += 1
            c[row["category"] + " yes"] += right == "yes"
        return {kind: c[kind + " yes"] / c[kind] for kind in ("yes/no", "negated yes/no")}, c
    prior, _ = yes_share([])
    balanced, c = yes_share(["--balance-answers"])
    assert prior["yes/no"] < 0.3 and prior["negated yes/no"] > 0.7           # the prior this flag removes
    assert all(0.42 < balanced[kind] < 0.58 for kind in balanced), balanced  # n ~ 370 per type: sd ~ 0.026
    assert c["colour"] + c["shape"] > 0.4 * 1500                             # ~25% of all questions before, ~50% now


def write_sources(root):
    """Local copies of the six sources (hub layout, from the dataset cards). The better response always says GOOD."""
    import datasets
    from PIL import Image
    jsonl = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows)) or path
    b64 = base64.b64encode(png_bytes()).decode()
    chat = lambda q, a, b: json.dumps([{"role": "user", "content": [
        {"type": "text", "text": PROMPT_TEMPLATE.format(question=q, answer1=a, answer2=b)},
        {"type": "image", "image": "/authors/disk/x.jpg"}]}])
    rl = [dict(question="q0", message=chat("q0", "GOOD a", "BAD b"), answer=["<answer>1</answer>"], image=b64),
          dict(question="q1", message=chat("q1", "BAD a\n\nline 2", "GOOD b"), answer=["<answer>2</answer>"], image=b64),
          dict(question="q2", message=chat("q2", "a", "b"), answer=["<answer>3</answer>"], image=b64),
          dict(question="q3", message=json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
               answer=["<answer>1</answer>"], image=b64),
          dict(question="q4", message=chat("q4", "GOOD", "BAD"), answer=["<answer>1</answer>"], image="not base64!")]
    datasets.Dataset.from_list(rl).to_parquet(str(root / "rl.parquet"))
    for sub in ("long", "short", "mcq", "safety"):
        (root / "mm" / sub).mkdir(parents=True)
        (root / "mm" / sub / "0.png").write_bytes(png_bytes())
    mm = [dict(prompt=f"mm {s}", chosen="GOOD", rejected="BAD", image=f"{s}/0.png") for s in ("long", "short", "mcq", "safety", "long")]
    mm += [dict(prompt="v", chosen="GOOD", rejected="BAD", video="video/abc"),
           dict(prompt="same", chosen="x", rejected="x", image="long/0.png"),
           dict(prompt="gone", chosen="GOOD", rejected="BAD", image="short/missing.png")]
    jsonl(root / "mm" / "dpo_pairs.jsonl", mm)
    datasets.Dataset.from_dict(dict(question=["r0", "r1", "r2", "r3"], chosen=["GOOD", "GOOD", "", "GOOD"],
                                    rejected=["BAD"] * 4, image=[{"bytes": png_bytes("blue"), "path": None}] * 3 + [
                                        {"bytes": b"not an image", "path": None}])).cast_column(
        "image", datasets.Image()).to_parquet(str(root / "rlaif.parquet"))
    (root / "vlf").mkdir()
    (root / "vlf" / "a.png").write_bytes(png_bytes())
    comp = lambda resp, *r: dict(model="m", response=resp, annotations={k: {"Rating": v, "Rationale": ""} for k, v in zip(
        ("Helpfulness", "Ethical Considerations", "Visual Faithfulness"), r)})
    jsonl(root / "vlf" / "vlfeedback_80k.jsonl", [
        dict(id="v0", prompt="vf0", img_path="a.png", completions=[comp("BAD", "1", "5", "1"), comp("GOOD", "5", "5", "4"),
                                                                   comp("mid", "3", "3", "3")]),          # 2.33 / 4.67 / 3
        dict(id="v1", prompt="tie", img_path="a.png", completions=[comp("x", "3", "3", "3"), comp("y", "3", "3", "3")]),
        dict(id="v2", prompt="na", img_path="a.png", completions=[comp("x", "N/A", "N/A", "N/A"), comp("y", "4", "4", "4")])])
    (root / "coco").mkdir()
    (root / "coco" / "COCO_train2014_1.jpg").write_bytes(png_bytes())
    human = lambda q: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "x"}]
    (root / "povid.json").write_text(json.dumps([
        dict(id="p0", image="COCO_train2014_1.jpg", conversations=human("What is here?"), chosen="GOOD", rejected="BAD"),
        dict(id="p1", image="COCO_train2014_9.jpg", conversations=human("q"), chosen="GOOD", rejected="BAD"),
        dict(id="p2", image="COCO_train2014_1.jpg", chosen="GOOD", rejected="BAD")]))          # no question at all
    conv = lambda q, a, turns=1: [{"role": "user", "content": q}, {"role": "assistant", "content": a}] * turns
    datasets.Dataset.from_dict(dict(
        conversation_a=[conv("w0", "BAD"), conv("w1", "GOOD"), conv("w2", "a"), conv("w3", "a", 2)],
        conversation_b=[conv("w0", "GOOD"), conv("w1", "BAD"), conv("w2", "b"), conv("w3", "b", 2)],
        winner=["model_b", "model_a", "tie (bothbad)", "model_a"], turn=[1, 1, 1, 2],
        image=[Image.new("RGB", (32, 32), "green")] * 4)).cast_column("image", datasets.Image()).to_parquet(str(root / "wv.parquet"))
    return ["--local", f"r1-rl={root / 'rl.parquet'}", "--local", f"mmrlhf={root / 'mm' / 'dpo_pairs.jsonl'}",
            "--local", f"rlaif-v={root / 'rlaif.parquet'}", "--local", f"vlfeedback={root / 'vlf' / 'vlfeedback_80k.jsonl'}",
            "--local", f"povid={root / 'povid.json'}", "--image-root", f"povid={root / 'coco'}",
            "--local", f"wildvision={root / 'wv.parquet'}"]


def test_stage1_every_source_maps_to_the_pair_schema(tmp_path):
    """Counts per source and drops by reason as built above; the output passes load_items; the GOOD response sits
    at the labelled position; positions are balanced 1:1 within every source (to one for an odd count)."""
    (tmp_path / "src").mkdir()
    flags = write_sources(tmp_path / "src")
    meta = run_stage1(tmp_path, "--source", "hub", "--hub", "r1-rl", "mmrlhf", "rlaif-v", "vlfeedback", "povid",
                      "wildvision", *flags)
    rep = meta["report"]
    assert {k: (v["rows"], v["kept"]) for k, v in rep.items()} == {
        "r1-rl": (5, 2), "mmrlhf": (8, 5), "rlaif-v": (4, 2), "vlfeedback": (3, 1), "povid": (3, 1), "wildvision": (4, 2)}
    assert rep["r1-rl"]["dropped"] == {"answer is not <answer>1|2</answer>": 1, "prompt is not the Table 1 template": 1,
                                       "image not found or unreadable": 1}
    assert rep["mmrlhf"]["dropped"] == {"video (R1-Reward has none)": 1, "identical responses": 1,
                                        "image not found or unreadable": 1}
    assert rep["mmrlhf"]["by_source"] == {"mmrlhf-long": 2, "mmrlhf-short": 1, "mmrlhf-mcq": 1, "mmrlhf-safety": 1}
    assert rep["rlaif-v"]["dropped"] == {"empty or non-text question/response": 1,
                                         "malformed row (UnidentifiedImageError)": 1}    # undecodable embedded image
    assert rep["vlfeedback"]["dropped"] == {"all ratings tie": 1, "fewer than 2 rated responses": 1}
    assert rep["povid"]["dropped"] == {"image not found or unreadable": 1, "malformed row (TypeError)": 1}
    assert rep["wildvision"]["dropped"] == {"no decisive winner": 1, "multi-turn battle": 1}
    items = load_items(tmp_path / "out" / "train_pairs.jsonl")
    assert len(items) == 13 == meta["counts"]["train_pairs"]
    for it in items:
        assert it[f"response{it['label']}"].startswith("GOOD") and not it[f"response{3 - it['label']}"].startswith("GOOD")
        assert it["think"].endswith(f"Response {it['label']} is better.")
    by_source = {}
    for it in items:
        by_source.setdefault(it["source"].split("-")[0], []).append(it["label"])
    assert all(abs(v.count(1) - v.count(2)) <= len(v) % 2 for v in by_source.values())
    q1 = next(it for it in items if it["question"] == "q1")                  # multi-line responses survive the template
    assert {q1["response1"], q1["response2"]} == {"GOOD b", "BAD a\n\nline 2"}
    assert {it["question"] for it in items if it["source"] == "povid"} == {"What is here?"}


class FileServer:
    """A loopback file host for a hub-like source: path -> (status, body, delay in seconds)."""

    def __init__(self, routes):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                status, body, delay = routes.get(self.path.split("?")[0], (404, b"", 0))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(body)
                except OSError:
                    pass
            do_HEAD = do_GET

        cls = type("Server", (ThreadingHTTPServer,), dict(daemon_threads=True, block_on_close=False))
        self.httpd = cls(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True).start()


@pytest.mark.parametrize("path,error", [("/ok.jsonl", None), ("/slow.jsonl", "Timeout"), ("/e500.jsonl", "Unable to find"),
                                        ("/garbage.jsonl", "DatasetGenerationError")])
def test_stage1_hub_like_source_over_http(tmp_path, path, error):
    """The MM-RLHF pair file served over HTTP: read it, or stop at once with a message naming the source and --local."""
    (tmp_path / "src").mkdir()
    write_sources(tmp_path / "src")
    rows = (tmp_path / "src" / "mm" / "dpo_pairs.jsonl").read_bytes()
    server = FileServer({"/ok.jsonl": (200, rows, 0), "/slow.jsonl": (200, rows, 2.0), "/e500.jsonl": (500, b"oops", 0),
                         "/garbage.jsonl": (200, b"<html>maintenance</html>", 0)})
    flags = ["--source", "hub", "--hub", "mmrlhf", "--local", f"mmrlhf={server.url}{path}",
             "--image-root", f"mmrlhf={tmp_path / 'src' / 'mm'}", "--download-timeout", "0.3"]
    t0 = time.time()
    try:
        if error is None:
            assert run_stage1(tmp_path, *flags)["report"]["mmrlhf"]["kept"] == 5
        else:
            with pytest.raises(SystemExit) as e:
                run_stage1(tmp_path, *flags)
            assert "source mmrlhf: could not load" in str(e.value) and error in str(e.value)
            assert "--local mmrlhf=PATH" in str(e.value) and time.time() - t0 < 5
    finally:
        server.httpd.shutdown()


def test_stage1_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """No network: a hub source stops before any retry loop, naming the source, its hub id and --local."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run_stage1(tmp_path, "--source", "hub", "--hub", "rlaif-v")
    assert "source rlaif-v: the hub (openbmb/RLAIF-V-Dataset) cannot be reached" in str(e.value)
    assert "--local rlaif-v=PATH" in str(e.value) and time.time() - t0 < 2


class TeacherServer(ChatServer):
    """A teacher that answers the Table 1 prompt: #OK right at once, #SECOND right from the 2nd try, #NEVER always
    wrong, #GARBAGE no tags, #SLOW too slow, #500 an HTTP 500. "Right" = the response that says GOOD."""

    def __init__(self):
        self.seen = Counter()
        super().__init__()

    def reply(self, text):
        q = text.split("###### [Question]:\n")[1].split("  \n")[0]
        right = 1 if "[Response 1]:\nGOOD" in text else 2
        with self.lock:
            self.seen[q] += 1
        if "#SLOW" in q:
            time.sleep(1.5)
        if "#500" in q:
            return 500, "text/plain", b"oops"
        if "#GARBAGE" in q:
            return 200, "application/json", completion("I would pick the first one.")
        pick = right if "#OK" in q or ("#SECOND" in q and self.seen[q] >= 2) else 3 - right
        return 200, "application/json", completion(f"<think>Response {pick} says GOOD.</think><answer>{pick}</answer>")


def test_stage1_api_teacher_attempts_difficulty_and_failures(tmp_path):
    """Difficulty = the attempt whose choice matched the label (attempts + 1 = never); failed calls are dropped
    and counted; every request carries the image."""
    (tmp_path / "mm" / "long").mkdir(parents=True)
    (tmp_path / "mm" / "long" / "0.png").write_bytes(png_bytes())
    marks = ["#OK", "#SECOND", "#NEVER", "#GARBAGE", "#SLOW", "#500"]
    (tmp_path / "mm" / "dpo_pairs.jsonl").write_text("".join(json.dumps(dict(
        prompt=m, chosen="GOOD", rejected="BAD", image="long/0.png")) + "\n" for m in marks))
    server = TeacherServer()
    try:
        meta = run_stage1(tmp_path, "--source", "hub", "--hub", "mmrlhf", "--local",
                          f"mmrlhf={tmp_path / 'mm' / 'dpo_pairs.jsonl'}", "--teacher-url", server.url,
                          "--teacher-model", "teacher", "--teacher-timeout", "0.3", "--teacher-retries", "0")
    finally:
        server.stop()
    items = {it["question"]: it for it in load_items(tmp_path / "out" / "train_pairs.jsonl")}
    assert {q: it["difficulty"] for q, it in items.items()} == {"#OK": 1, "#SECOND": 2, "#NEVER": 4, "#GARBAGE": 4}
    assert items["#OK"]["think"] == f"Response {items['#OK']['label']} says GOOD." and "think" not in items["#NEVER"]
    t = meta["report"]["teacher"]
    assert t["dropped_failed_calls"] == 2 and t["difficulty"] == {"1": 1, "2": 1, "4": 2}
    assert (t["calls"], t["ok"], t["timeouts"], t["http_errors"]) == (6 + 3 + 2, 9, 1, 1)
    assert server.seen == Counter({"#OK": 1, "#SECOND": 2, "#NEVER": 3, "#GARBAGE": 3, "#SLOW": 1, "#500": 1})
    assert all(b["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
               for b in server.bodies)


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


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_warmup_cosine_by_hand(floor):
    """total 6, warmup 0.34 -> W = int(2.04) = 2 warm-up steps: factors 1/2, 2/2. Then s = 2..6 puts the cosine at
    0, pi/4, pi/2, 3pi/4, pi, i.e. (1 + cos)/2 = 1, q, 1/2, 1 - q, 0 with q = (2 + sqrt 2)/4, each mapped to
    floor + (1 - floor) * value. The LR read before optimizer step s is the factor for s."""
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=2.0)
    sched = warmup_cosine(opt, total=6, warmup=0.34, floor=floor)
    got = []
    for _ in range(7):
        got.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    q = (2 + 2 ** 0.5) / 4
    assert got == pytest.approx([0.5, 1.0] + [floor + (1 - floor) * v for v in (1.0, q, 0.5, 1 - q, 0.0)])


def test_gpu_busy_seconds_is_the_union_of_kernel_spans():
    """Hand-computed: CUDA spans [0, 2], [1, 3], [5, 6] and [5.5, 5.8] us -> union [0, 3] + [5, 6] = 4 us (their
    sum would be 6.3 us); a CPU event [0, 100] does not count."""
    from types import SimpleNamespace as NS
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    spans = [(5, 6, cuda), (0, 2, cuda), (0, 100, cpu), (1, 3, cuda), (5.5, 5.8, cuda)]
    prof = NS(events=lambda: [NS(time_range=NS(start=s, end=e), device_type=d) for s, e, d in spans])
    assert gpu_busy_seconds(prof) == pytest.approx(4e-6)
    assert gpu_busy_seconds(NS(events=lambda: [])) == 0.0


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
    """STAGE SUBPROCESS. 03 mines only the 8 good items and records every skipped row in meta.json. With one
    attempt no item can reach difficulty 3, so --min-difficulty 3 makes all 8 "easy": --keep-easy 0.5 keeps 4 of
    them, each once."""
    rc, log = run_stage("03_mine_hard.py", ["--data", tiny / "train_pairs.jsonl", "--model", sft_ref / "model",
                                            "--out", tmp_path, "--num-items", 0, "--attempts", 1, "--max-new-tokens", 4,
                                            "--max-prompt-tokens", 400, "--min-difficulty", 3, "--keep-easy", 0.5],
                        tmp_path / "log")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert rc == 0 and meta["tried"] == 8 and meta["skipped_items"] == PAIR_SKIPS, log[-2000:]
    ids = [json.loads(line)["id"] for line in (tmp_path / "rl_pairs.jsonl").read_text().splitlines()]
    assert (meta["kept_hard"], meta["kept_easy"], meta["kept"]) == (0, 4, 4)
    assert len(set(ids)) == 4 and set(ids) <= {f"p{i}" for i in range(8)}


RL = ["--steps", "5", "--rollout-batch", "2", "--train-batch", "2", "--micro-batch", "2", "--max-new-tokens", "8",
      "--save-every", "1", "--max-prompt-tokens", "400"]


@pytest.fixture(scope="module")
def rl(tiny, sft_ref):
    """Two tiny RL runs side by side from the tiny SFT model: "ref", uninterrupted, and "nan", with a NaN loss in
    steps 1 and 2 and --max-bad-steps 2 (and step 2 profiled)."""
    data = ["--data", tiny / "train_pairs.jsonl", "--model", sft_ref / "model"]
    root = sft_ref.parent
    ref, nan = run_stages(("04_stable_reinforce.py", [*data, "--out", root / "rl_ref", *RL], root / "rl_ref.log"),
                          ("04_stable_reinforce.py", [*data, "--out", root / "rl_nan", *RL, "--inject-nan-at", 1, 2,
                                                      "--max-bad-steps", 2, "--profile-step", 2], root / "rl_nan.log"))
    assert ref[0] == 0, ref[1][-3000:]
    return dict(data=data, ref=root / "rl_ref", nan=root / "rl_nan", nan_result=nan)


def test_stage4_profile_step_profiles_the_old_logp_pass_and_one_optimizer_step(rl):
    """STAGE SUBPROCESS. --profile-step 2 writes two profiles of step 2, each headed by its wall time and the GPU's
    busy share (none on a CPU); the old-log-prob pass names its batching ("collate") among the ops by CPU time."""
    for part in ("old_logp", "train"):
        text = (rl["nan"] / f"profile_step2_{part}.txt").read_text()
        wall, busy = float(text.split()[0]), float(text.split("GPU busy ")[1].split()[0])
        assert wall > 0 and busy == 0.0
        assert "aten::" in text
    assert "collate" in (rl["nan"] / "profile_step2_old_logp.txt").read_text()
    assert not (rl["ref"] / "profile_step2_train.txt").exists()


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


def test_stage4_torchrun_two_ranks_fsdp2_and_resume(sft_ref, rl):
    """STAGE SUBPROCESS. `torchrun --standalone --nproc_per_node=2` on CPU (gloo + FSDP2): two steps, then --resume to
    three. Every step reports its ranks in step, each step trains on the same items as the one-process run (split
    between the ranks), the losses are finite, and the saved model loads with the original keys."""
    out = sft_ref.parent / "rl_two_ranks"
    args = [*rl["data"], "--out", out, *RL[2:], "--micro-batch", "1"]       # same batches as rl["ref"], 1 per rank
    for extra in (["--steps", "2"], ["--steps", "3", "--resume"]):
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(REPO / "04_stable_reinforce.py"), *map(str, args + extra)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got, ref = rows(out), rows(rl["ref"])[:3]
    assert [g["step"] for g in got] == [1, 2, 3] and all(g["ranks_in_step"] for g in got)
    assert [sorted(g["ids"]) for g in got] == [sorted(r["ids"]) for r in ref]
    assert all(math.isfinite(g["policy_loss"]) for g in got)
    assert weights_of(out / "model").keys() == weights_of(sft_ref / "model").keys()


def test_stage2_micro_batches_and_checkpointing_change_nothing(tiny, sft_ref):
    """STAGE SUBPROCESS. --micro-batch 1 --grad-ckpt (each source's items one at a time, activations recomputed in
    the backward pass): each source's loss is still the mean over ALL its response tokens, so every step's items,
    loss and gradient norm equal those of the whole-batch run (up to float summation order)."""
    out = sft_ref.parent / "micro"
    rc, log = run_stage("02_sft.py", ["--data", tiny, "--out", out, *SFT, "--inject-nan-at", 3, "--micro-batch", 1,
                                      "--grad-ckpt"], out.with_suffix(".log"))
    assert rc == 0, log[-3000:]
    got, ref = rows(out), rows(sft_ref)
    assert pick(got, ("step", "pair_ids", "vqa_ids", "skipped_step")) == pick(ref, ("step", "pair_ids", "vqa_ids", "skipped_step"))
    for g, f in zip(got, ref):
        if not f["skipped_step"]:
            assert g["loss"] == pytest.approx(f["loss"], rel=1e-4) and g["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-3)


def test_stage2_torchrun_two_ranks_fsdp2_matches_one_process(tiny, sft_ref):
    """STAGE SUBPROCESS. SFT under `torchrun --standalone --nproc_per_node=2` (gloo + FSDP2) on the same data and
    flags as the one-process run: the same items every step (split between the ranks), the same first-step loss
    (same weights; the logged loss is the mean of the two ranks' mean losses), and the NaN injected at step 3
    skipped on both ranks."""
    out = sft_ref.parent / "sft_two_ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "02_sft.py"), "--data", str(tiny), "--out", str(out), *SFT, "--inject-nan-at", "3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got, ref = rows(out), rows(sft_ref)
    assert [g["step"] for g in got] == list(range(1, 9))
    assert [(sorted(g["pair_ids"]), sorted(g["vqa_ids"])) for g in got] == \
        [(sorted(f["pair_ids"]), sorted(f["vqa_ids"])) for f in ref]
    assert [g["skipped_step"] for g in got] == [f["skipped_step"] for f in ref] == [False, False, True] + [False] * 5
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], abs=2e-4)


# ---------------------------------------------------------------- the random-weights 7B shape (02 --model random-7b)
def test_random_7b_shape_has_the_public_parameter_counts():
    """Built on the meta device (no memory): 8.29B parameters in all, embed and lm_head 0.545B each (152064 x 3584),
    28 decoder layers and 32 vision blocks, untied -- the numbers of the public Qwen2.5-VL-7B config (STACK.md s10)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from stable_reinforce_core import qwen25vl_config
    ids = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])}
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(ids, 600, "random-7b"))
    n = sum(p.numel() for p in model.parameters())
    assert 8.28e9 < n < 8.30e9
    assert model.lm_head.weight.numel() == model.model.language_model.embed_tokens.weight.numel() == 152064 * 3584
    assert len(model.model.language_model.layers) == 28 and len(model.model.visual.blocks) == 32
    text = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert 7.61e9 < text < 7.63e9                                       # LLM 7.62B, ViT + merger 0.68B
