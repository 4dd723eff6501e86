"""Streaming cost: tokens/s of the decode a segment at a time (plain) vs 16 tokens at a time
(--stream) on the small model shape (random weights, 120 new tokens, within the context,
the default sampling), alternating A B A B.

  JAX_PLATFORMS=cpu python scripts/bench_stream.py
"""
import time, jax, numpy as np
from configs import small
from minigpt_jax import generate, interactive
from minigpt_jax.model import ModelConfig, init_params
from minigpt_jax.tokenizer import CharTokenizer

c = small.get_config()
cfg = ModelConfig.from_section(dict(c.model, compute_dtype="float32", attention_impl="xla"), 99)
params = init_params(cfg, jax.random.key(0))
sampling = generate.SamplingConfig(temperature=c.sample.temperature, top_k=c.sample.top_k,
                                   top_p=c.sample.top_p)  # the default sampling
G, REPS, RUNS = 120, 5, 5
prompt = [CharTokenizer().encode("def ")]
kw = dict(max_new_tokens=G, sampling=sampling, seed=0, stop_at_eos=False)
plain = lambda: generate.generate_tokens(params, cfg, prompt, **kw)
stream = lambda: np.concatenate(list(generate.decode(params, cfg, prompt,
                                                     chunk=interactive.STREAM_CHUNK, **kw)), 1)
assert (plain() == stream()).all()  # also compiles both
rates = {"plain": [], "stream": []}
for _ in range(REPS):
  for name, f in (("plain", plain), ("stream", stream)):
    t0 = time.perf_counter()
    for _ in range(RUNS):
      f()
    rates[name].append(RUNS * G / (time.perf_counter() - t0))
for name, r in rates.items():
  print(name, "tokens/s:", " ".join(f"{x:.0f}" for x in r), f"median {np.median(r):.0f}")
print(f"stream/plain (medians): {np.median(rates['stream']) / np.median(rates['plain']):.2f}")
