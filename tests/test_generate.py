import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import model_config
from minigpt_jax import generate, prompts, reference
from minigpt_jax.errors import UserError
from minigpt_jax.model import KVCache, MiniGPT, init_params
from minigpt_jax.generate import SamplingConfig, sample, top_k_filter, top_p_filter
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer, TokenizerError

CFG = model_config(context_len=64)
PARAMS = init_params(CFG, jax.random.key(0))
GREEDY = SamplingConfig(greedy=True)
tok = CharTokenizer()


def _random_prompt(n, seed):
  return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 2, 99))


# One compile of the decode step per config and cache size, shared by the cases below.
_step = jax.jit(lambda params, tok, cache, cfg: MiniGPT(cfg).apply({"params": params}, tok,
                                                                  cache=cache),
                static_argnames="cfg")


# Prompt lengths: 1, 16 and 40 are padded to a bucket capped by the room the new tokens
# leave; 15 + its marker fills the 16 bucket exactly. bf16: measured max |diff| 2e-3 on
# logits of ~0.5.
@pytest.mark.parametrize("dtype,tol,prompt_len", [
    ("float32", 1e-5, 1), ("float32", 1e-5, 15), ("float32", 1e-5, 40), ("bfloat16", 2e-2, 16)])
def test_cached_logits_equal_full_forward(prompt_len, dtype, tol):
  """Prefill + N decode steps give the logits of the full forward pass over the same tokens."""
  cfg = dataclasses.replace(CFG, compute_dtype=dtype)
  steps = 64 - prompt_len - 1 - 2  # within 3 slots of the context limit
  tokens_BP, start_B = prompts.pad_prompts([_random_prompt(prompt_len, prompt_len)], steps,
                                            cfg.context_len)
  P = tokens_BP.shape[1]
  follow = np.asarray(jax.random.randint(jax.random.key(9), (1, steps), 2, 99))
  seq = jnp.asarray(np.concatenate([tokens_BP, follow], axis=1))

  full, _ = MiniGPT(cfg).apply({"params": PARAMS}, seq, start_B=jnp.asarray(start_B))
  cache = KVCache.init(cfg, 1, P + steps, start_B)
  first, cache = MiniGPT(cfg).apply({"params": PARAMS}, seq[:, :P], cache=cache)
  got = [first[:, -1]]
  for t in range(steps - 1):
    logits, cache = _step(PARAMS, seq[:, P + t:P + t + 1], cache, cfg)
    got.append(logits[:, 0])
  np.testing.assert_allclose(jnp.stack(got, 1), full[:, P - 1:-1], atol=tol, rtol=tol)
  assert int(cache.index) == P + steps - 1


def test_cache_is_written_where_the_model_says():
  cache = KVCache.init(CFG, 2, 20)
  _, cache = MiniGPT(CFG).apply({"params": PARAMS}, jnp.ones((2, 7), jnp.int32), cache=cache)
  k = np.stack(cache.k_BHSK)  # [L, B, H, S, K]
  assert k.shape == (2, 2, 4, 20, 8)
  assert int(cache.index) == 7
  assert np.abs(k[:, :, :, :7]).sum(axis=(0, 1, 2, 4)).min() > 0
  assert np.abs(k[:, :, :, 7:]).max() == 0


def test_greedy_cached_and_uncached_sequences_identical_and_ragged_rows_equal_one_by_one():
  prompts = [_random_prompt(n, n) for n in (1, 5, 20)]
  a = generate.generate_tokens(PARAMS, CFG, prompts, max_new_tokens=30, sampling=GREEDY,
                               stop_at_eos=False)
  b = reference.generate_tokens(PARAMS, CFG, prompts, max_new_tokens=30, sampling=GREEDY,
                                stop_at_eos=False)
  assert a.shape == (3, 30)
  np.testing.assert_array_equal(a, b)
  for row, p in enumerate(prompts):  # ragged rows in one batch: each as if alone
    alone = generate.generate_tokens(PARAMS, CFG, [p], max_new_tokens=30, sampling=GREEDY,
                                     stop_at_eos=False)
    np.testing.assert_array_equal(a[row], alone[0])


@pytest.mark.parametrize("slots, forwards, segment", [(1, 510, 128), (16, 47, 8), (32, 31, 16),
                                                     (5, 3, 128), (16, 47, 0), (7, 0, 8)])
@pytest.mark.parametrize("chunk", [0, 3, 16])
def test_decode_plan_covers_every_call_in_growing_caches(slots, forwards, segment, chunk):
  plan = generate.decode_plan(slots, forwards, segment, chunk)
  assert sum(calls for _, calls in plan) == forwards
  write, caps = slots, []
  for cap, calls in plan:
    assert calls >= 1 and write + calls <= cap  # every call writes a slot the cache has
    assert chunk == 0 or calls <= chunk
    write += calls
    caps.append(cap)
    if cap != write:  # a cache size is left only once its slots are all written
      assert plan[len(caps)][0] == cap
  assert write == slots + forwards and caps == sorted(caps)  # the last slot is the last one made
  if segment > 0:
    sizes = sorted(set(caps))
    assert all(cap % segment == 0 for cap in sizes[:-1])
    assert all(b - a <= segment for a, b in zip([slots, *sizes], sizes))


def test_decode_plan_by_hand():
  # Empty prompt (1 slot), 511 new tokens -> 510 model calls.
  assert generate.decode_plan(1, 510, 128) == [(128, 127), (256, 128), (384, 128),
                                                   (511, 127)]
  assert generate.decode_plan(1, 510, 0) == [(511, 510)]
  assert generate.decode_plan(16, 20, 128) == [(36, 20)]
  assert generate.decode_plan(16, 20, 8, 5) == [(24, 5), (24, 3), (32, 5), (32, 3), (36, 4)]


SEGMENT_PROMPTS = [_random_prompt(n, 200 + n) for n in (1, 7, 22)]
SAMPLED = SamplingConfig(temperature=0.8, top_k=30)


@pytest.mark.parametrize("segment", [0, 16])
def test_segmented_decode_equals_uncached(segment):
  """Segment boundaries (the cache growing mid-generation: 16 grows it twice, 0 never)
  change no token, greedy and sampled, with and without stopping at <eos> (hot sampling
  makes every row stop early), down to one new token. The sampled runs are the cached vs
  uncached check for a top-k sample with the same seed."""
  hot = SamplingConfig(temperature=3.0, top_k=30)
  runs = [(GREEDY, 33, False), (SAMPLED, 33, False), (hot, 33, True), (hot, 1, True)]
  stopped = 0
  for sampling, n, stop in runs:
    kw = dict(max_new_tokens=n, sampling=sampling, seed=3, stop_at_eos=stop)
    a = generate.generate_tokens(PARAMS, CFG, SEGMENT_PROMPTS, segment=segment, **kw)
    b = reference.generate_tokens(PARAMS, CFG, SEGMENT_PROMPTS, **kw)
    assert a.shape == (3, n)
    np.testing.assert_array_equal(a, b)
    stopped += int(stop and (a[:, :-1] == EOS_ID).any())
  assert stopped  # the <eos> case was really exercised


def test_unrolled_decode_equals_uncached():
  """Unrolling the scan (fewer loop iterations on a GPU) changes no token: 3 (not a divisor
  of the scans' 4 calls) and 64 (more than any segment's calls)."""
  kw = dict(max_new_tokens=9, sampling=SAMPLED, seed=3, stop_at_eos=False)
  b = reference.generate_tokens(PARAMS, CFG, SEGMENT_PROMPTS, **kw)
  assert generate.decode_plan(32, 8, 4) == [(36, 4), (40, 4)]  # prompt bucket 32
  for unroll in (3, 64):
    a = generate.generate_tokens(PARAMS, CFG, SEGMENT_PROMPTS, segment=4, unroll=unroll, **kw)
    np.testing.assert_array_equal(a, b)


def test_decode_makes_one_model_call_per_token_after_the_first():
  """N new tokens: the first comes from the prefill logits, then N - 1 calls, each writing
  one cache slot; no call is spent after the last token."""
  calls = []
  real = generate.decode_scan
  counting = lambda *a, **k: calls.append(a[7]) or real(*a, **k)  # a[7]: the scan's steps
  with pytest.MonkeyPatch.context() as m:
    m.setattr(generate, "decode_scan", counting)
    new_BC = generate.generate_tokens(PARAMS, CFG, [_random_prompt(3, 1)], max_new_tokens=20,
                                      sampling=GREEDY, stop_at_eos=False, segment=8)
  assert new_BC.shape == (1, 20)
  assert calls == [8, 8, 3]  # prompt bucket 16: slots 16-23, 24-31, 32-34


def test_decode_scan_writes_one_slot_per_call():
  tokens_BP, start_B = prompts.pad_prompts([_random_prompt(3, 1)], 20, CFG.context_len)
  P = tokens_BP.shape[1]
  cache = KVCache.init(CFG, 1, P, start_B)
  cache, tok_B, _ = generate.prefill(PARAMS, CFG, jnp.asarray(tokens_BP), cache,
                                    jax.random.key(0), 0, jnp.zeros(1, bool), GREEDY, False)
  assert cache.slots == P and int(cache.index) == P
  cache, _, _, new_BC = generate.decode_scan(PARAMS, CFG, cache.grow(P + 19), tok_B,
                                             jnp.zeros(1, bool), jax.random.key(0), 1, 19,
                                             GREEDY, False)
  assert new_BC.shape == (1, 19) and int(cache.index) == P + 19
  k = np.stack(cache.k_BHSK)  # [L, B, H, S, K]
  assert np.abs(k[:, :, :, start_B[0]:]).sum(axis=(0, 1, 2, 4)).min() > 0  # every slot written


# --- samples longer than the context ------------------------------------------------------------

def test_window_rule_by_hand():
  """Context 8, keep 5: all tokens up to 8, then windows of 5, 6, 7, 8, 5, ..."""
  lens = generate.window_len(np.arange(1, 19), 8, 5)
  assert lens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
  assert generate.window_keep(128) == 64 and generate.window_keep(2) == 1


SHORT = model_config(context_len=16)
SHORT_PARAMS = init_params(SHORT, jax.random.key(1))


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0, top_k=40)],
                         ids=["greedy", "sampled"])
def test_long_samples_cached_equal_uncached_across_window_restarts(sampling):
  """160 tokens in a context of 16 (about 18 restarts per row; ragged rows restart at
  different steps), float32: the same tokens both ways, and again for the same seed; and
  (greedy) each ragged row the same as when decoded alone."""
  prompts_ = [_random_prompt(n, 400 + n) for n in (1, 6, 13)]
  kw = dict(max_new_tokens=160, sampling=sampling, seed=7, stop_at_eos=False)
  a = generate.generate_tokens(SHORT_PARAMS, SHORT, prompts_, segment=8, **kw)
  b = reference.generate_tokens(SHORT_PARAMS, SHORT, prompts_, **kw)
  assert a.shape == (3, 160)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, generate.generate_tokens(SHORT_PARAMS, SHORT, prompts_, **kw))
  assert len(np.unique(a)) > 10  # real text, not one token repeated
  if sampling.greedy:
    for row, p in enumerate(prompts_):
      alone = generate.generate_tokens(SHORT_PARAMS, SHORT, [p], **kw)
      np.testing.assert_array_equal(a[row], alone[0])


def test_long_samples_stop_at_eos_across_window_restarts():
  """Hot sampling ends rows at <eos> at different steps, past the context: cached, chunked
  and uncached agree, and an ended row stays ended across restarts."""
  prompts_ = [_random_prompt(n, 600 + n) for n in (5, 6, 15)]  # 15: a restart at once
  kw = dict(max_new_tokens=160, sampling=SamplingConfig(temperature=2.5), seed=14,
            stop_at_eos=True)
  a = generate.generate_tokens(SHORT_PARAMS, SHORT, prompts_, **kw)
  b = reference.generate_tokens(SHORT_PARAMS, SHORT, prompts_, **kw)
  c = np.concatenate(list(generate.decode(SHORT_PARAMS, SHORT, prompts_, chunk=3, **kw)), 1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, :c.shape[1]], c)
  ends = [np.flatnonzero(row == EOS_ID) for row in a]
  assert all(len(e) == 1 for e in ends) and len({int(e[0]) for e in ends}) == 3
  assert max(int(e[0]) for e in ends) > 16  # at least one row ended after a restart
  for row, [end] in zip(a, ends):
    assert (row[end + 1:] == PAD_ID).all()


def test_window_keep_must_leave_the_window_room_to_grow():
  with pytest.raises(ValueError, match="keep must be in"):
    generate.generate_tokens(SHORT_PARAMS, SHORT, [_random_prompt(2, 0)], max_new_tokens=30,
                             sampling=GREEDY, keep=16)
  one = model_config(context_len=1, n_layers=1, d_model=8, n_heads=1, d_ff=8)
  out = generate.generate_tokens(init_params(one, jax.random.key(0)), one, [np.zeros(0, int)],
                                 max_new_tokens=3, sampling=GREEDY, stop_at_eos=False)
  assert out.shape == (1, 3)  # a context of 1 keeps its one token


def test_a_window_restart_sees_only_the_kept_tokens():
  """Right after a restart the model is fed the last `keep` tokens alone."""
  calls = []
  real = generate.prefill
  spy = lambda params, cfg, tokens_BP, *args: calls.append(np.asarray(tokens_BP)) or real(
      params, cfg, tokens_BP, *args)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(generate, "prefill", spy)
    new = generate.generate_tokens(SHORT_PARAMS, SHORT, [_random_prompt(3, 9)],
                                   max_new_tokens=40, sampling=GREEDY, stop_at_eos=False, keep=10)
  row = np.concatenate([[EOS_ID], _random_prompt(3, 9), new[0]])
  # The prompt's 4 tokens (not padded: the sample outgrows the context anyway), then
  # restarts as the 17th, 24th, 31st and 38th of the 44 tokens is consumed.
  assert [c.shape for c in calls] == [(1, 4), (1, 10), (1, 10), (1, 10), (1, 10)]
  np.testing.assert_array_equal(calls[1][0], row[16 - 9:16 + 1])
  np.testing.assert_array_equal(calls[2][0], row[23 - 9:23 + 1])


def test_kv_cache_grow_keeps_contents_and_refuses_to_shrink():
  cache = KVCache.init(CFG, 2, 5)
  cache = cache.replace(k_BHSK=tuple(k + 1.0 for k in cache.k_BHSK),
                        end_L=jnp.full((CFG.n_layers,), 5, jnp.int32))
  grown = cache.grow(9)
  assert grown.slots == 9 and int(grown.index) == 5
  for before, after in zip(cache.k_BHSK, grown.k_BHSK):
    np.testing.assert_array_equal(after[:, :, :5], before)
    assert np.abs(np.asarray(after[:, :, 5:])).max() == 0
  with pytest.raises(ValueError, match="fewer than the 9"):
    grown.grow(4)


def test_bfloat16_generation_cached_equals_uncached():
  """The 16-bit path (parameters cast once before decoding) is consistent too."""
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  prompts = [_random_prompt(n, 50 + n) for n in (2, 11)]
  a = generate.generate_tokens(PARAMS, cfg, prompts, max_new_tokens=20, sampling=GREEDY,
                               stop_at_eos=False)
  b = reference.generate_tokens(PARAMS, cfg, prompts, max_new_tokens=20, sampling=GREEDY,
                                stop_at_eos=False)
  np.testing.assert_array_equal(a, b)


def test_same_seed_same_output_and_other_seed_differs():
  s = SamplingConfig(temperature=1.0)
  p = [tok.encode("def ")] * 2
  a = generate.generate_tokens(PARAMS, CFG, p, max_new_tokens=40, sampling=s, seed=1)
  b = generate.generate_tokens(PARAMS, CFG, p, max_new_tokens=40, sampling=s, seed=1)
  c = generate.generate_tokens(PARAMS, CFG, p, max_new_tokens=40, sampling=s, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # rows draw independently


def test_generation_stops_at_eos():
  # A model whose LM head always prefers <eos> (id 1).
  params = jax.tree.map(lambda x: x, PARAMS)
  params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])
  params["ln_f"]["bias"] = jnp.ones_like(params["ln_f"]["bias"])
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 1].set(1.0)
  out = generate.generate_tokens(params, CFG, [tok.encode("x")], max_new_tokens=5,
                                 sampling=GREEDY)
  np.testing.assert_array_equal(out, [[1, 0, 0, 0, 0]])
  text = generate.generate_text(params, CFG, tok, ["x"], max_new_tokens=5, sampling=GREEDY)
  assert text == [""]


def test_prompt_buckets_limit_retracing():
  assert [prompts.bucket(n, 512) for n in (1, 16, 17, 100, 300)] == [16, 16, 32, 128, 512]
  assert prompts.bucket(300, 400) == 400
  tokens, start = prompts.pad_prompts([np.array([5, 6]), np.array([7])], 10, 64)
  np.testing.assert_array_equal(start, [13, 14])
  np.testing.assert_array_equal(tokens[0, 13:], [1, 5, 6])
  assert (tokens[0, :13] == 0).all()


def test_no_prompt_is_a_clear_error():
  with pytest.raises(UserError, match="no prompt to continue"):
    prompts.pad_prompts([], 10, 64)


def test_prompt_over_the_context_is_a_clear_error():
  prompts.pad_prompts([np.zeros(63, np.int32)], 300, 64)  # fits: its marker takes the 64th
  with pytest.raises(UserError, match="64 characters does not fit the context of 64"):
    prompts.pad_prompts([np.zeros(64, np.int32)], 1, 64)
  with pytest.raises(TokenizerError, match="'é' at 2"):
    generate.generate_text(PARAMS, CFG, tok, ["a é"], max_new_tokens=4, sampling=GREEDY)


# Sampling functions on hand-made logits.

def test_top_k_filter_keeps_k_largest():
  logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
  out = top_k_filter(logits, 2)
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True, False]])
  np.testing.assert_array_equal(top_k_filter(logits, 0), logits)


def test_top_p_filter_keeps_smallest_nucleus():
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  logits = jnp.log(probs)
  np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, 0.5)), [[True, False, False, False]])
  np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, 0.7)), [[True, True, False, False]])
  np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, 0.81)), [[True, True, True, False]])
  np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, 0.01)), [[True, False, False, False]])


def test_sampling_never_picks_excluded_tokens():
  logits = jnp.tile(jnp.array([[0.0, 2.0, 1.9, 1.8, -1.0, 1.7]]), (4096, 1))
  key = jax.random.key(0)
  k2 = np.asarray(sample(key, logits, SamplingConfig(top_k=2)))
  assert set(k2.tolist()) == {1, 2}
  p = np.asarray(sample(key, logits, SamplingConfig(top_p=0.5)))
  assert set(p.tolist()) <= {1, 2, 3} and len(set(p.tolist())) > 1
  g = np.asarray(sample(key, logits, SamplingConfig(greedy=True)))
  assert (g == 1).all()


def test_temperature_sharpens():
  logits = jnp.tile(jnp.array([[0.0, 1.0]]), (20000, 1))
  hot = np.asarray(sample(jax.random.key(0), logits, SamplingConfig(temperature=2.0))).mean()
  cold = np.asarray(sample(jax.random.key(0), logits, SamplingConfig(temperature=0.25))).mean()
  # P(token 1) = sigmoid(1 / T): 0.62 at T=2, 0.98 at T=0.25.
  assert abs(hot - 0.622) < 0.02 and abs(cold - 0.982) < 0.01


def test_sampling_config_validation():
  with pytest.raises(UserError, match="temperature must be > 0"):
    SamplingConfig(temperature=0.0)
  with pytest.raises(UserError, match="top_p must be in"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(UserError, match="top_k must be >= 0"):
    SamplingConfig(top_k=-1)
