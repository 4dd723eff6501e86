"""Throughput of the training step and of cached vs uncached decoding (`bench` runs it).

Needs no corpus: training reads random token ids through the real `train_step`, jitted
with the shardings and donation training uses. Decoding starts from an
empty prompt (only the start marker) and is greedy, with no early stop at `<eos>`.
Every figure is the median of `repeats` timed runs after a warm-up; a table goes to
stderr and one JSON object to stdout (and to --json_out).
"""

import contextlib
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import flax
import jax
import jaxlib
import numpy as np
import optax

from minigpt_jax import generate, hardware, reference, sharding, train_step
from minigpt_jax.errors import UserError
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import ModelConfig, flops_per_token, init_params, param_count
from minigpt_jax.tokenizer import CharTokenizer

SCHEMA = "minigpt_jax.bench/1"
DATA_TOKENS = 4 << 20  # random ids the training step samples its windows from
GREEDY = SamplingConfig(greedy=True)


def parse_sizes(items, name: str) -> list[int]:
  """Positive ints from a flag's list of strings (`None` stays `None`)."""
  if items is None:
    return None
  try:
    sizes = [int(s) for s in items if str(s).strip()]
  except ValueError:
    raise UserError(f"--{name} must be comma-separated integers, got {','.join(items)!r}")
  if any(s < 1 for s in sizes):
    raise UserError(f"--{name} must be positive, got {sizes}")
  return sizes


def timed_repeats(fn: Callable[[], None], repeats: int,
                  clock: Callable[[], float] = time.perf_counter) -> list[float]:
  """Wall seconds of `repeats` calls of `fn` (which must block until its work is done)."""
  seconds = []
  for _ in range(repeats):
    t0 = clock()
    fn()
    seconds.append(clock() - t0)
  return seconds


def rate(count: float, seconds: list[float]) -> tuple[float, list[float]]:
  """(count / median seconds, count / seconds of each repeat)."""
  return count / statistics.median(seconds), [count / s for s in seconds]


def peak_memory_bytes(device=None) -> Optional[int]:
  """The backend's peak bytes in use so far in this process, or None (CPU reports nothing)."""
  stats = (device or jax.devices()[0]).memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": dev.platform, "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "process_count": jax.process_count(),
      "host_cpus": os.cpu_count(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__},
  }


# --- training ------------------------------------------------------------------------------

def bench_train_step(step_fn, state, train_N, *, batch_size: int, context_len: int, fpt: float,
                     steps: int, repeats: int, warmup: int):
  """Times `steps` optimizer steps per repeat. Returns (row, state after the last step)."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, train_N)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  hardware.fit_host_memory_to(hardware.scratch_bytes(compiled))  # as training does
  box = {"state": state, "metrics": None}

  def steps_of(n):
    for _ in range(n):
      box["state"], box["metrics"] = compiled(box["state"], train_N)
    jax.block_until_ready(box["state"])

  steps_of(warmup)
  seconds = timed_repeats(lambda: steps_of(steps), repeats)
  tokens = steps * batch_size * context_len
  tok_s, tok_s_each = rate(tokens, seconds)
  row = {
      "batch_size": batch_size, "tokens_per_step": batch_size * context_len,
      "lower_s": t1 - t0, "compile_s": t2 - t1,
      "step_s": statistics.median(seconds) / steps,
      "tokens_per_s": tok_s, "tokens_per_s_repeats": tok_s_each,
      "tflops_per_s": fpt * tok_s / 1e12, "mfu": hardware.mfu(fpt, tok_s),
      "peak_memory_bytes": peak_memory_bytes(),
      "compiled_memory": hardware.compiled_memory(compiled),
      "final_loss": float(box["metrics"]["loss"]),
  }
  return row, box["state"]


# --- decoding ------------------------------------------------------------------------------

def bench_decode(params, cfg: ModelConfig, *, batch: int, new_tokens: int, cached: bool,
                 repeats: int, seed: int = 0, segment: int = generate.DECODE_SEGMENT,
                 unroll: int = generate.DECODE_UNROLL) -> dict:
  """Greedy generation of `new_tokens` per row from an empty prompt, through the sampler's
  own `generate_tokens` (prefill, the 16-bit parameter cast, the copy back)."""
  empty = [np.zeros((0,), np.int32)] * batch
  P = generate.pad_prompts(empty, new_tokens, cfg.context_len)[0].shape[1]

  def generate_once():
    kw = dict(max_new_tokens=new_tokens, sampling=GREEDY, seed=seed, stop_at_eos=False)
    if cached:
      generate.generate_tokens(params, cfg, empty, segment=segment, unroll=unroll, **kw)
    else:
      reference.generate_tokens(params, cfg, empty, **kw)

  first = timed_repeats(generate_once, 1)[0]  # compiles
  seconds = timed_repeats(generate_once, repeats)
  tok_s, tok_s_each = rate(batch * new_tokens, seconds)
  return {"mode": "cached" if cached else "uncached", "batch": batch, "new_tokens": new_tokens,
          "prompt_slots": P, "first_call_s": first, "seconds": statistics.median(seconds),
          "tokens_per_s": tok_s, "tokens_per_s_repeats": tok_s_each}


def bench_long_decode(params, cfg: ModelConfig, *, batch: int, new_tokens: int, repeats: int,
                      seed: int = 0) -> dict:
  """A sample of `new_tokens` per row, past the context (the window rule's restarts
  included), against one that fills the context, timed alternately (in context, long, in
  context, long, ...) so that both see the same machine. Greedy, empty prompts."""
  empty = [np.zeros((0,), np.int32)] * batch
  calls = {n: functools.partial(generate.generate_tokens, params, cfg, empty, max_new_tokens=n,
                               sampling=GREEDY, seed=seed, stop_at_eos=False)
          for n in (cfg.context_len - 1, new_tokens)}
  first = {n: timed_repeats(fn, 1)[0] for n, fn in calls.items()}  # compiles
  seconds = {n: [] for n in calls}
  for _ in range(repeats):
    for n, fn in calls.items():
      seconds[n] += timed_repeats(fn, 1)
  (short, short_s), (long, long_s) = seconds.items()
  ratios = [(new_tokens / l) / (short / s) for s, l in zip(short_s, long_s)]
  return {"mode": "cached", "batch": batch, "new_tokens": new_tokens,
          "in_context_tokens": short, "first_call_s": first[long],
          "seconds": statistics.median(long_s),
          "tokens_per_s": rate(batch * new_tokens, long_s)[0],
          "in_context_tokens_per_s": rate(batch * short, short_s)[0],
          "long_over_in_context": statistics.median(ratios),
          "long_over_in_context_repeats": ratios}


def decode_plan(batches, tokens: int, uncached_tokens: int, skip_uncached: bool):
  """(cached, batch, new tokens) to run: cached at both lengths, so every uncached run has a
  cached twin to compare with."""
  lengths = sorted({tokens} if skip_uncached else {tokens, uncached_tokens})
  plan = [(True, b, n) for b in batches for n in lengths]
  return plan if skip_uncached else plan + [(False, b, uncached_tokens) for b in batches]


def speedups(rows: list[dict]) -> list[dict]:
  """cached / uncached tokens/s for every (batch, new_tokens) measured both ways."""
  by = {(r["mode"], r["batch"], r["new_tokens"]): r["tokens_per_s"] for r in rows}
  return [{"batch": b, "new_tokens": n, "cached_over_uncached": by["cached", b, n] / u}
          for (mode, b, n), u in by.items() if mode == "uncached" and ("cached", b, n) in by]


# --- the whole run -------------------------------------------------------------------------

def run(config, *, batch_sizes: Optional[list[int]] = None, decode_batches=(1, 8),
        decode_tokens: int = 0, uncached_tokens: int = 0, skip_uncached: bool = False,
        long_tokens: int = 2000,
        decode_segment: Optional[int] = None, decode_unroll: Optional[int] = None,
        train_steps: int = 10, repeats: int = 5,
        warmup: int = 2, command: str = "", profile_dir: Optional[str] = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
  """Runs the benchmark for `config` and returns the result as a JSON-ready dict. The
  arguments are `bench`'s flags; `batch_sizes` None: config.train.batch_size, []: none;
  `decode_segment` and `decode_unroll` None: as when sampling."""
  decode_segment = generate.DECODE_SEGMENT if decode_segment is None else decode_segment
  decode_unroll = generate.DECODE_UNROLL if decode_unroll is None else decode_unroll
  if decode_unroll < 1:
    raise UserError(f"--decode_unroll must be >= 1, got {decode_unroll}")
  cfg = hardware.resolve(ModelConfig.from_section(config.model, CharTokenizer().vocab_size))
  batch_sizes = [config.train.batch_size] if batch_sizes is None else sorted(batch_sizes)
  decode_tokens = decode_tokens or cfg.context_len - 1  # an empty prompt fills the context
  uncached_tokens = uncached_tokens or decode_tokens
  mesh = sharding.make_mesh(config.mesh)
  check_request(config, cfg, mesh, batch_sizes, (decode_tokens, uncached_tokens), decode_segment,
                train_steps, repeats, warmup, long_tokens)
  result = {"schema": SCHEMA, "command": command, **environment(),
            "mesh": dict(mesh.shape), "peak_flops_per_device": hardware.peak_flops(),
            "model": dataclasses.asdict(cfg), "param_count": None,
            "flops_per_token": flops_per_token(cfg), "compute_dtype": cfg.compute_dtype,
            "attention_impl": cfg.attention_impl}
  log(f"{result['device_count']} x {result['device_kind']} ({result['platform']}), "
      f"compute {cfg.compute_dtype}, attention {cfg.attention_impl}")
  trace = jax.profiler.trace(profile_dir, create_perfetto_trace=True) if profile_dir else (
      contextlib.nullcontext())
  with trace:
    result["param_count"], rows = train_rows(config, cfg, mesh, batch_sizes, train_steps,
                                             repeats, warmup, log)
    result["train"] = {"steps_per_repeat": train_steps, "repeats": repeats,
                       "warmup_steps": warmup, "data": f"{DATA_TOKENS} random token ids",
                       "results": rows}
    plan = decode_plan(decode_batches, decode_tokens, uncached_tokens, skip_uncached)
    hardware.fit_host_memory_to(0)  # decode with freed memory kept, as `sample` does
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(config.seed))
    rows = decode_rows(params, cfg, plan, repeats, decode_segment, decode_unroll, config.seed,
                       log)
    long_rows = []
    if long_tokens:
      for b in decode_batches:
        log(f"decode: cached, batch {b}, {long_tokens} tokens, alternated with "
            f"{cfg.context_len - 1} ...")
        long_rows.append(bench_long_decode(params, cfg, batch=b, new_tokens=long_tokens,
                                           repeats=repeats, seed=config.seed))
  result["decode"] = {"prompt": "empty (the start marker only)", "sampling": "greedy",
                      "stop_at_eos": False, "cache_segment": decode_segment,
                      "unroll": decode_unroll, "repeats": repeats, "results": rows,
                      "speedups": speedups(rows), "long": long_rows}
  return result


def decode_rows(params, cfg: ModelConfig, plan, repeats: int, segment: int, unroll: int,
                seed: int, log) -> list[dict]:
  """One `bench_decode` row per (cached, batch, new tokens) of `plan` (random weights)."""
  rows = []
  for cached, b, n in plan:
    log(f"decode: {'cached' if cached else 'uncached'}, batch {b}, {n} tokens ...")
    rows.append(bench_decode(params, cfg, batch=b, new_tokens=n, cached=cached, repeats=repeats,
                             seed=seed, segment=segment, unroll=unroll))
  return rows


def check_request(config, cfg: ModelConfig, mesh, batch_sizes, decode_lengths, decode_segment,
                  train_steps: int, repeats: int, warmup: int, long_tokens: int = 0) -> None:
  """Refuses a benchmark that cannot run, before any compilation."""
  if config.mesh.distributed:
    raise UserError("the benchmark runs in one process; set --config.mesh.distributed=False")
  if min(train_steps, repeats) < 1 or warmup < 0:
    raise UserError("--train_steps and --repeats must be >= 1, --warmup >= 0")
  if long_tokens < 0:
    raise UserError(f"--long_tokens must be >= 0 (0: none), got {long_tokens}")
  if decode_segment < 0 or 0 < decode_segment < 16:
    raise UserError(f"--decode_segment must be 0 (no segments) or >= 16 (each segment "
                    f"compiles its own loop), got {decode_segment}")
  room = cfg.context_len - 1  # the start marker takes a slot
  for n in decode_lengths:
    if not 1 <= n <= room:
      raise UserError(f"decode tokens must be in [1, {room}] (context_len - 1: "
                      f"one slot holds the start marker), got {n}")
  for b in batch_sizes:
    if b % mesh.size:
      raise UserError(f"batch size {b} is not divisible by the {mesh.size} devices of the mesh")


def train_rows(config, cfg: ModelConfig, mesh, batch_sizes, train_steps: int, repeats: int,
               warmup: int, log) -> tuple[int, list[dict]]:
  """(parameter count, one `bench_train_step` row per batch size); the train state and the
  random ids are made only when a batch size is asked for."""
  tx, abstract, state_sh = train_step.state_layout(config, cfg, mesh)
  rows = []
  if batch_sizes:
    state = train_step.fresh_state(config, cfg, tx, state_sh)
    rng = np.random.default_rng(config.seed)
    train_N = sharding.put_replicated(
        mesh, rng.integers(0, cfg.vocab_size, max(DATA_TOKENS, 2 * cfg.context_len + 2), np.uint8))
    for b in batch_sizes:
      log(f"train: batch {b} x {cfg.context_len}, {warmup} + {repeats} x {train_steps} steps ...")
      step_fn = train_step.jit_train_step(config, cfg, mesh, tx, state_sh, b)
      row, state = bench_train_step(step_fn, state, train_N, batch_size=b,
                                    context_len=cfg.context_len, fpt=flops_per_token(cfg),
                                    steps=train_steps, repeats=repeats, warmup=warmup)
      rows.append(row)
  return param_count(abstract.params), rows


def format_table(result: dict) -> str:
  """A readable summary of `run`'s result."""
  mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
  pct = lambda x: "-" if x is None else f"{x:.1%}"
  lines = [f"{result['device_count']} x {result['device_kind']}, jax {result['versions']['jax']}, "
           f"{result['param_count']:,} params, {result['flops_per_token'] / 1e6:.1f} MFLOP/token, "
           f"{result['compute_dtype']}, attention {result['attention_impl']}",
           f"{'batch':>6} {'compile s':>9} {'step ms':>9} {'tok/s':>12} {'TFLOP/s':>8} "
           f"{'MFU':>6} {'peak MiB':>9} {'loss':>6}"]
  for r in result["train"]["results"]:
    lines.append(f"{r['batch_size']:>6} {r['lower_s'] + r['compile_s']:>9.1f} "
                 f"{r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>12,.0f} "
                 f"{r['tflops_per_s']:>8.3f} {pct(r['mfu']):>6} "
                 f"{mib(r['peak_memory_bytes']):>9} {r['final_loss']:>6.3f}")
  lines.append(f"{'decode':>9} {'batch':>6} {'tokens':>7} {'first s':>8} {'tok/s':>10}")
  for r in result["decode"]["results"]:
    lines.append(f"{r['mode']:>9} {r['batch']:>6} {r['new_tokens']:>7} "
                 f"{r['first_call_s']:>8.1f} {r['tokens_per_s']:>10,.0f}")
  for r in result["decode"]["long"]:
    lines.append(f"{'long':>9} {r['batch']:>6} {r['new_tokens']:>7} {r['first_call_s']:>8.1f} "
                 f"{r['tokens_per_s']:>10,.0f}  {r['long_over_in_context']:.2f}x the "
                 f"{r['in_context_tokens']}-token sample's {r['in_context_tokens_per_s']:,.0f}")
  for s in result["decode"]["speedups"]:
    lines.append(f"cached/uncached, batch {s['batch']}, {s['new_tokens']} tokens: "
                 f"{s['cached_over_uncached']:.1f}x")
  return "\n".join(lines)
