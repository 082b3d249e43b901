"""The base config every wireless study starts from; study files pick the pipelines.

Sizes: ``get_config("cpu")`` (the default) is sized for a 2-core CPU; ``"full"`` is the
size one would run on a Colab GPU/TPU. Override any field on the command line, e.g.
``--config.prune.sparsity=0.8``.
"""

import ml_collections

SIZES = ("cpu", "full", "tiny")


def base_config(size: str | None = "cpu") -> ml_collections.ConfigDict:
  """Returns the shared config; ``size`` is one of `SIZES` ("tiny" is for tests)."""
  size = size or "cpu"
  if size not in SIZES:
    raise ValueError(f"config size must be one of {SIZES}, got {size!r}")
  full, tiny = size == "full", size == "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Seeds of a sweep: the whole pipeline list runs once per seed; the table reports each
  # seed and the mean and standard deviation across them.
  c.seeds = (0,)

  # The link: 16-QAM symbols (and five modulation classes) through the 3GPP indoor-factory
  # LOS channel (K = 7 dB, RMS delay spread ~53 ns at 20 Msym/s) with a slowly moving
  # receiver, Es/N0 drawn per example.
  c.channel = ml_collections.ConfigDict(dict(
      modulation="qam16",
      modulations=("bpsk", "qpsk", "psk8", "qam16", "qam64"),
      seq_len=256 if full else 64,
      num_pilots=16 if full else 8,
      profile="inf_los",
      k_factor_db=7.0,          # ignored by "inf_los" (it fixes its own); used by others
      delay_spread_ns=53.0,     # likewise
      sample_rate_hz=20e6,
      num_taps=4,               # taps the channel head regresses (profile truncated to it)
      doppler_hz=200.0,         # ~ walking speed at 28 GHz, or a slow AGV at 5 GHz
      snr_db=(0.0, 25.0),
      snr_type="es_n0",
  ))

  c.teacher = ml_collections.ConfigDict(dict(
      width=256 if full else (32 if tiny else 64),
      depth=8 if full else (1 if tiny else 3),
      num_heads=8 if full else (2 if tiny else 4),
      head_dim=32 if full else 16,
      mlp_dim=1024 if full else (64 if tiny else 128),
      patch=4 if tiny else 2,   # 2 samples per token: ~2x the cost of 4, far lower SER
      positions="learned",
  ))
  # The smaller architecture that a "distill:small" stage trains.
  c.student = ml_collections.ConfigDict(dict(
      width=128 if full else (16 if tiny else 32),
      depth=4 if full else 1 if tiny else 2,
      num_heads=4 if full else 2,
      head_dim=32 if full else (8 if tiny else 16),
      mlp_dim=512 if full else (32 if tiny else 64),
      patch=2 if full else 4,
      positions="learned",
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=20000 if full else (30 if tiny else 1000),
      batch_size=256 if full else (16 if tiny else 64),   # frames per task per step
      learning_rate=1e-3,
      warmup_steps=1000 if full else (5 if tiny else 100),
      weight_decay=1e-4,
      tasks=("modulation", "symbols", "channel"),
      log_every=1000 if full else (10 if tiny else 100),
      # Scale: devices used for data parallelism (0 = every device JAX sees, on every
      # host); several seeds can train as one vmapped program instead of one by one.
      num_devices=0,
      vmap_seeds=False,
      # Reliability: the training state is checkpointed every this many steps (0 = off)
      # in each stage's ckpt/ directory, and a rerun resumes from the newest readable
      # one; orbax keeps the newest keep_checkpoints (>= 2) of them.
      checkpoint_every=1000 if full else (10 if tiny else 100),
      keep_checkpoints=2,
      # Updates from non-finite gradients are skipped and counted; this many in a row
      # stops the run as diverged.
      max_nonfinite=20,
  ))
  stage_steps = 4000 if full else (10 if tiny else 150)
  c.prune = ml_collections.ConfigDict(dict(
      steps=stage_steps,
      learning_rate=3e-4,
      sparsity=0.5,
      score="magnitude",        # magnitude | random | saliency | movement
      structure="unstructured", # unstructured | "n:m" (e.g. "2:4") | neuron | head
      scope="layer",            # layer | global
      schedule="polynomial",    # polynomial (Zhu & Gupta, over the first half) | one_shot
  ))
  c.quantize = ml_collections.ConfigDict(dict(
      steps=stage_steps,        # 0: post-training quantization only, no QAT
      learning_rate=1e-4,
      bits=8,
      symmetric=True,
      granularity="channel",    # channel | tensor
  ))
  # "distill" fine-tunes the compressed model with these settings; "distill:small" trains
  # a fresh c.student from scratch with the teacher's steps and schedule (c.train).
  c.distill = ml_collections.ConfigDict(dict(
      steps=stage_steps,
      learning_rate=3e-4,
      temperature=4.0,
      alpha=0.5,                # weight of the soft-target term (Hinton et al., 2015)
  ))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=128 if tiny else 512,   # frames per task per evaluation batch
      num_batches=1 if tiny else 2,
      snr_edges=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
      latency_batch=64,
      latency_repeats=5 if tiny else 10,
  ))
  # name -> stages, comma-separated, run in order on the trained teacher. Stage names: prune,
  # quantize, distill; "distill:small" distils into c.student, "distill" (or
  # "distill:inherit") into the running compressed model, keeping its constraints.
  c.pipelines = ml_collections.ConfigDict()
  return c
