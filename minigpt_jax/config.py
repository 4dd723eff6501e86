"""The full configuration, commented field by field; `configs/*.py` start from it.

Units: sizes of text in characters (= tokens), schedules in optimizer steps.
"""

from ml_collections import ConfigDict

from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CharTokenizer


def base_config() -> ConfigDict:
  """The full ~25.6M-parameter model (configs/full.py), trained on a GPU."""
  c = ConfigDict()
  c.seed = 0  # parameter init and the batch sequence (a batch is a function of seed and step)
  c.workdir = "checkpoints"  # runs land in <workdir>/<run_name>/
  c.run_name = "full"  # a run directory that already holds checkpoints is resumed
  # Fine-tuning: a new run starts from the parameters of this run directory (or of its
  # ckpt/<step>/), with a fresh optimizer and its own schedule; "" = a fresh init. The
  # model section must be the source's. A run that has checkpoints resumes from its own.
  c.init_from = ""
  c.init_from_step = 0  # the step of init_from to start from; 0 = its latest

  c.data = data_section()

  c.model = ConfigDict()
  c.model.context_len = 512  # tokens
  c.model.d_model = 512
  c.model.n_layers = 8
  c.model.n_heads = 8  # head size = d_model / n_heads = 64
  c.model.d_ff = 2048  # FFN hidden width
  c.model.vocab_pad_multiple = 128  # LM head width rounded up to this (GPU-friendly); 1 = none
  c.model.compute_dtype = "auto"  # "auto": bfloat16 on GPU/TPU, float32 on CPU; params stay float32
  c.model.attention_impl = "auto"  # "auto": cuDNN flash on GPU with 16-bit compute, else "xla"
  c.model.tie_embeddings = False  # True: the LM head is the token embedding (not padded)

  c.train = ConfigDict()
  c.train.steps = 10_000
  c.train.batch_size = 64  # sequences per step (global, over all devices)
  c.train.lr = 6e-4  # peak learning rate
  c.train.warmup_steps = 200
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
  c.train.weight_decay = 0.1  # applied to matmul kernels only
  c.train.decay_embeddings = False  # True: to the token and position embeddings too
  # "adamw"; "muon": Muon (optax.contrib) on the blocks' matrices at train.muon_lr, AdamW
  # at train.lr on the embeddings, LM head, biases and norms
  c.train.optimizer = "adamw"
  c.train.muon_lr = 0.02
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0  # global-norm clip
  c.train.log_every = 50  # steps between console/JSONL train metrics
  c.train.eval_every = 500  # steps between validation evals (and samples)
  c.train.eval_batches = 20  # batches per periodic validation eval
  c.train.ckpt_every = 1000  # steps between checkpoints (one is always written at the end)
  c.train.keep = 3  # checkpoints kept
  c.train.stop_at_step = 0  # end this invocation at this step, with a checkpoint; 0 = train.steps
  c.train.debug_recompiles = False  # log every trace of the jitted functions

  # How samples are drawn: during training, and the default of `sample` and `evaluate`.
  c.sample = ConfigDict()
  c.sample.prompt = "def "
  c.sample.num_samples = 2
  # tokens per sample, also `evaluate`'s default; past the context the model keeps its
  # most recent ones (generate.window_keep)
  c.sample.max_new_tokens = 2000
  c.sample.temperature = 0.8
  c.sample.top_k = 0  # 0 = off
  c.sample.top_p = 0.95  # 1.0 = off

  c.mesh = mesh_section()
  return c


def data_section() -> ConfigDict:
  """The corpus: which Python files, how much of them, and where it is prepared."""
  d = ConfigDict()
  d.dir = "data"  # prepared corpora land in <dir>/<name>/
  d.name = "stdlib+site"
  # Source roots, walked for *.py in sorted order: "stdlib" and "site-packages"
  # name the running interpreter's; anything else is a folder path.
  d.roots = ("stdlib", "site-packages")
  d.max_chars = 120_000_000  # cap on the whole corpus; 0 = no cap
  d.max_file_chars = 1_000_000  # skip larger files (mostly generated tables); 0 = no cap
  d.val_fraction = 0.1  # fraction of files (chosen by a hash of their path) held out
  d.rebuild = False  # rebuild the prepared corpus even if it exists
  return d


def mesh_section() -> ConfigDict:
  """The device mesh; a size of -1 takes all the remaining devices."""
  m = ConfigDict()
  m.data = -1  # data-parallel replicas (devices); the batch is split over data x fsdp
  m.fsdp = 1  # devices each large parameter (and its Adam state) is split over
  # Multi-process (one process per host or per GPU): jax.distributed.initialize().
  # Left empty, each of the three comes from JAX's own detection: Slurm, Open MPI,
  # Cloud TPU, or JAX_COORDINATOR_ADDRESS for the address.
  m.distributed = False
  m.coordinator_address = ""  # "host:port" of process 0, reachable by all; "" = detect
  m.num_processes = 0  # 0 = detect
  m.process_id = -1  # 0 .. num_processes - 1; -1 = detect
  return m


SEED_RANGE = range(2**32)  # JAX takes a seed modulo 2**32: others would repeat these


def check_seed(seed, name: str = "--seed") -> int:
  """`seed`, once it is an integer in `SEED_RANGE`; every seed a user gives passes here
  (`validate`'s `seed`, the commands' `--seed`). JAX would fail on one past 64 bits and
  silently wrap one past 32."""
  if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEED_RANGE:
    raise UserError(f"{name} must be an integer in [0, {SEED_RANGE.stop - 1}], got {seed!r}")
  return seed


# The largest model size JAX indexes (int32: positions, cache slots); past it, a jitted call
# overflows on the value itself.
MAX_MODEL_SIZE = 2**31 - 1


MODEL_SIZES = ("context_len", "d_model", "n_layers", "n_heads", "d_ff", "vocab_pad_multiple")
MODEL_CHOICES = {"compute_dtype": ("auto", "float32", "bfloat16", "float16"),
                 "attention_impl": ("auto", "xla", "cudnn")}


def model_problem(model) -> str | None:
  """What is wrong with a `model` section (a ConfigDict, or a dict from a run's config.json),
  or None: the one check of the model settings, before `ModelConfig.from_section` builds
  them. `tie_embeddings` may be missing (a run saved before it existed: untied)."""
  fields = {*MODEL_SIZES, *MODEL_CHOICES, "tie_embeddings"}
  if odd := sorted((set(model) ^ fields) - {"tie_embeddings"}):
    return f"the model section has unknown or missing fields: {', '.join(odd)}"
  for name in MODEL_SIZES:
    value = model[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      return f"model.{name} must be a positive integer, got {value!r}"
    if value > MAX_MODEL_SIZE:  # JAX indexes positions and cache slots with int32
      return f"model.{name} must be at most {MAX_MODEL_SIZE} (2**31 - 1), got {value}"
  if model["d_model"] % model["n_heads"]:
    return f"model.d_model {model['d_model']} is not divisible by model.n_heads {model['n_heads']}"
  for name, allowed in MODEL_CHOICES.items():
    if model[name] not in allowed:
      return f"model.{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {model[name]!r}"
  if not isinstance(model.get("tie_embeddings", False), bool):
    return f"model.tie_embeddings must be true or false, got {model['tie_embeddings']!r}"
  return None


def validate(c: ConfigDict) -> None:
  """Catches values of the right type but the wrong kind, before any work starts."""
  check_seed(c.seed, "seed")
  roots = c.data.roots
  if not isinstance(roots, (tuple, list)) or not roots or not all(isinstance(r, str) for r in roots):
    raise UserError(f"data.roots must be a non-empty tuple of strings, got {roots!r}")
  if problem := model_problem(c.model):
    raise UserError(problem)
  for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep",
               "eval_batches"):
    if not isinstance(c.train[name], int) or c.train[name] < 1:
      raise UserError(f"train.{name} must be a positive integer, got {c.train[name]!r}")
  for name in ("max_chars", "max_file_chars"):
    value = c.data[name]
    if not isinstance(value, int) or value < 0:
      raise UserError(f"data.{name} must be an integer >= 0 (0 = no cap), got {value!r}")
  t = c.train  # optimizer settings that would train the wrong way round or not at all
  rules = {"lr": (t.lr > 0, "> 0"), "grad_clip": (t.grad_clip > 0, "> 0"),
           "warmup_steps": (t.warmup_steps >= 0, ">= 0"),
           "min_lr_ratio": (0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
           "weight_decay": (t.weight_decay >= 0, ">= 0"),
           "b1": (0 <= t.b1 < 1, "in [0, 1)"), "b2": (0 <= t.b2 < 1, "in [0, 1)")}
  for name, (ok, rule) in rules.items():
    if not ok:
      raise UserError(f"train.{name} must be {rule}, got {t[name]!r}")
  if not 0 < c.data.val_fraction < 1:
    raise UserError(f"data.val_fraction must be in (0, 1), got {c.data.val_fraction}")
  from minigpt_jax.generate import SamplingConfig  # which checks the sampling settings
  try:
    SamplingConfig(temperature=c.sample.temperature, top_k=c.sample.top_k, top_p=c.sample.top_p)
  except UserError as e:
    raise UserError(f"sample.{e}") from None
  if c.sample.num_samples < 0 or c.sample.max_new_tokens < 1:
    raise UserError("sample.num_samples must be >= 0 and sample.max_new_tokens >= 1")
  if c.sample.num_samples and len(c.sample.prompt) + 1 > c.model.context_len:
    raise UserError(f"sample.prompt ({len(c.sample.prompt)} chars) does not fit the context "
                    f"of {c.model.context_len} (one slot holds the start marker)")
  for name, value in (("run_name", c.run_name), ("data.name", c.data.name)):
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
      raise UserError(f"{name} must be a plain folder name, got {value!r}")
  if not isinstance(c.init_from, str):
    raise UserError(f"init_from must be a run directory path or empty, got {c.init_from!r}")
  step = c.init_from_step
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise UserError(f"init_from_step must be >= 0 (0 = the latest), got {step!r}")
  if step and not c.init_from:
    raise UserError(f"init_from_step is {step} but init_from is empty; set "
                    "--config.init_from to the run to fine-tune")
  if not isinstance(c.train.stop_at_step, int) or c.train.stop_at_step < 0:
    raise UserError(f"train.stop_at_step must be >= 0 (0 = train.steps), got {c.train.stop_at_step!r}")
  CharTokenizer().encode(c.sample.prompt)  # its error names the characters
