import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import checkpoint, training
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, init_params

quiet = lambda *_: None


def test_loss_falls_on_a_tiny_corpus(tiny_config):
  tiny_config.train.steps = 80
  tiny_config.train.eval_every = 40
  tiny_config.sample.num_samples = 0
  s = training.train(tiny_config, log=quiet)
  steps = sorted(s.train_losses)
  first, last = s.train_losses[steps[0]], s.train_losses[steps[-1]]
  assert first > 3.5  # about ln(99) = 4.6 at the start
  assert last < first - 1.5, s.train_losses
  assert s.val_losses[80] < s.val_losses[40] < first


def test_weight_decay_only_on_kernels():
  cfg = ModelConfig(vocab_size=99, context_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  mask = training.decay_mask(init_params(cfg, jax.random.key(0)))
  assert mask["block_0"]["attn"]["qkv"]["kernel"] and mask["lm_head"]["kernel"]
  assert mask["block_0"]["ffn"]["up"]["kernel"]
  assert not mask["block_0"]["attn"]["qkv"]["bias"] and not mask["block_0"]["ln1"]["scale"]
  assert not mask["embed"]["token"]["embedding"] and not mask["embed"]["position"]["embedding"]


def test_checkpoint_round_trip(tmp_path):
  cfg = ModelConfig(vocab_size=99, context_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  params = init_params(cfg, jax.random.key(3))
  opt = {"mu": jnp.arange(5.0), "count": jnp.array(7)}
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 12, params, opt, {"step": 12})
  mngr.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "opt_state": opt})
  got = checkpoint.restore(checkpoint.manager(tmp_path, read_only=True), 12, abstract)
  jax.tree.map(np.testing.assert_array_equal, got["params"], params)
  jax.tree.map(np.testing.assert_array_equal, got["opt_state"], opt)


def test_nan_loss_stops_with_a_clear_error(tiny_config):
  tiny_config.train.lr = float("nan")
  tiny_config.train.log_every = 1
  with pytest.raises(UserError, match=r"loss is nan at step \d+; stopped"):
    training.train(tiny_config, log=quiet)


def _files(run_dir: pathlib.Path) -> dict:
  return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_with_another_model_is_refused_and_keeps_the_run(tiny_config):
  tiny_config.train.steps = 10
  tiny_config.sample.num_samples = 0
  s = training.train(tiny_config, log=quiet)
  before = _files(s.run_dir)
  tiny_config.model.d_model = 48
  with pytest.raises(UserError, match="another config.*model.d_model: run has 32, config has 48"):
    training.train(tiny_config, log=quiet)
  assert _files(s.run_dir) == before


def test_unreadable_checkpoint_is_a_clear_error_and_left_alone(tiny_config):
  tiny_config.train.steps = 10
  tiny_config.sample.num_samples = 0
  s = training.train(tiny_config, log=quiet)
  params_dir = s.run_dir / "ckpt" / "10" / "params"
  for f in params_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  before = _files(s.run_dir)
  tiny_config.train.steps = 20
  with pytest.raises(UserError, match="cannot restore checkpoint step 10"):
    training.train(tiny_config, log=quiet)
  with pytest.raises(UserError, match="cannot restore checkpoint step 10"):
    checkpoint.load_for_inference(str(s.run_dir))
  assert _files(s.run_dir) == before
