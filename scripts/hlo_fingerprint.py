"""Fingerprints of the programs JAX hands XLA: the training step, prefill and decode.

A refactor that leaves all three fingerprints unchanged leaves the compiled code, and so its
speed, unchanged. Run it in two checkouts and compare:

  JAX_PLATFORMS=cpu python scripts/hlo_fingerprint.py [configs/small.py]
"""
import hashlib
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path.cwd()))  # this checkout's package, not an installed one
from minigpt_jax import generate, hardware, sharding, train_step  # noqa: E402
from minigpt_jax.model import KVCache, ModelConfig, init_params  # noqa: E402
from minigpt_jax.tokenizer import CharTokenizer  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else "configs/small.py"
spec = importlib.util.spec_from_file_location("config_file", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config()
cfg = hardware.resolve(ModelConfig.from_section(c.model, CharTokenizer().vocab_size))
fingerprint = lambda lowered: hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]

mesh = sharding.make_mesh(c.mesh)
tx, abstract, state_sh = train_step.state_layout(c, cfg, mesh)
step = train_step.jit_train_step(c, cfg, mesh, tx, state_sh, c.train.batch_size)
corpus = jax.ShapeDtypeStruct((100_000,), np.uint8, sharding=sharding.replicated(mesh))
print("train_step", fingerprint(step.lower(abstract, corpus)))

params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
cache = jax.eval_shape(lambda: KVCache.init(cfg, 8, 16))
tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
sampling = generate.SamplingConfig(temperature=c.sample.temperature, top_p=c.sample.top_p)
done_B = jax.ShapeDtypeStruct((8,), bool)
print("prefill", fingerprint(generate.prefill.lower(
    params, cfg, tokens, cache, jax.random.key(0), 0, done_B, sampling, True)))
cache = jax.eval_shape(lambda: KVCache.init(cfg, 8, 128))
tok_B, done_B = jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((8,), bool)
print("decode_scan", fingerprint(generate.decode_scan.lower(
    params, cfg, cache, tok_B, done_B, jax.random.key(0), 16, 100, sampling, True)))
