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
  c.study = "wireless"  # launch.py dispatches to compressjax.studies.wireless.run
  c.size = size         # informational: results.md names it
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
      # Every frame opens with the preamble, the modulation task's too (a real burst
      # carries it for synchronization); the payload's modulation stays unknown.
      modulation_pilots=True,
      profile="inf_los",
      # Used by the "flat" and "exponential" profiles; "inf_los" fixes its own (K = 7 dB,
      # ~53 ns) and warns when these are moved from ChannelConfig's defaults.
      k_factor_db=10.0,
      delay_spread_ns=50.0,
      sample_rate_hz=20e6,
      num_taps=4,               # taps the channel head regresses (profile truncated to it)
      doppler_hz=200.0,         # ~ walking speed at 28 GHz, or a slow AGV at 5 GHz
      snr_db=(0.0, 30.0),       # drawn per training example; evaluation: eval.snr_points
      snr_type="es_n0",
      # The receiver's ADC on every frame, training and evaluation alike: 0 = ideal
      # samples; 1..8 bits per I and Q after AGC to the frame's RMS level, clipped at
      # adc_clip x RMS (None: the Gaussian-MSE-optimal clip for the bits, channels/adc.py;
      # a float placeholder, so --config.channel.adc_clip=2.5 overrides it).
      adc_bits=0,
      adc_clip=ml_collections.config_dict.placeholder(float),
  ))

  c.teacher = ml_collections.ConfigDict(dict(
      width=256 if full else (32 if tiny else 64),
      depth=8 if full else (1 if tiny else 3),
      num_heads=8 if full else (2 if tiny else 4),
      head_dim=32 if full else 16,
      mlp_dim=1024 if full else (64 if tiny else 128),
      patch=4 if tiny else 2,   # 2 samples per token: ~2x the cost of 4, far lower SER
      positions="learned",
      # The receiver's fixed front end: "pilots" feeds LS taps, a noise estimate and the
      # LMMSE-equalized symbols beside the raw I/Q (channels/frontend.py); "raw" only I/Q.
      frontend="pilots",
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
      frontend="pilots",
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=20000 if full else (30 if tiny else 1500),
      batch_size=256 if full else (16 if tiny else 64),   # frames per task per step
      learning_rate=1e-3,
      warmup_steps=1000 if full else (5 if tiny else 100),
      weight_decay=1e-4,
      tasks=("modulation", "symbols", "channel"),
      # Loss weight per task (missing: 1). The symbol task's loss ends smallest and its
      # errors matter most to the link, so it gets twice the pull on the shared network.
      task_weights=dict(symbols=2.0),
      log_every=1000 if full else (10 if tiny else 100),
      # Scale: devices used for data parallelism (0 = every device JAX sees, on every
      # host); several seeds can train as one vmapped program instead of one by one.
      num_devices=0,
      vmap_seeds=False,
      # The models' compute dtype: float32 | bfloat16 (for GPU/TPU; params and optimizer
      # state stay float32, the front end and the losses too).
      compute_dtype="float32",
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
      # unstructured | "n:m" (e.g. "2:4") | neuron | head; a "prune:structured" stage
      # removes whole heads and MLP units instead (each at this sparsity).
      structure="unstructured",
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
  # "finetune" trains the running model further with the plain task loss, keeping every
  # earlier constraint: the control that separates extra training from compression (as
  # many steps as a three-stage pipeline's).
  c.finetune = ml_collections.ConfigDict(dict(
      steps=3 * stage_steps,
      learning_rate=3e-4,
  ))
  # "budget:N" compresses the teacher to 1/N of its float32 bytes with per-layer bits and
  # sparsity (compressjax/allocation.py: measured sensitivity, exact knapsack), then
  # fine-tunes it with QAT and KD; "budget:Nu" uses the best single setting for every
  # layer within the same budget instead (the control).
  # It fine-tunes 3x as long as a three-stage pipeline (1350 steps at the cpu size): on
  # seed 0 at 1/10, 1350 steps at 1e-3 lost +0.14 / +0.16 dB at SER 1e-1 / 1e-2 (at 3e-4:
  # +0.14 / +0.38), while 450 steps at 3e-4 with min/max grids and float biases lost +1.0 dB.
  c.budget = ml_collections.ConfigDict(dict(
      steps=9 * stage_steps,
      learning_rate=1e-3,
      bits=(2, 4, 8) if tiny else (2, 3, 4, 6, 8),        # a layer's candidate bit widths
      sparsities=(0.0, 0.5) if tiny else (0.0, 0.25, 0.5, 0.75),  # ... and sparsities
      grid="mse",               # quantizer range: mse (least squared error) | minmax
      granularities=("channel",),   # a scale per output channel; add "tensor" for one
      rest_bits=8,              # the 1-D leaves (biases, LayerNorm): bits per tensor, 0 = float32
      sensitivity_batches=1 if tiny else 4,   # simulated batches the sensitivity averages
  ))
  # Every stage and the classical references are measured on the same frames: at each
  # Es/N0 point, frames_per_point frames per task (the 95% intervals count frames).
  c.eval = ml_collections.ConfigDict(dict(
      snr_points=tuple(2.5 * i for i in range(13)),   # 0, 2.5, ..., 30 dB
      frames_per_point=32 if tiny else (2048 if full else 384),
      batch_size=32 if tiny else (256 if full else 384),   # frames per task per eval batch
      high_snr_db=15.0,         # "mod. acc >= hi" averages the points at or above this
      latency_batch=1,          # served latency is timed at the eval batch and at this one
      latency_repeats=5 if tiny else 10,
  ))
  # Two pipeline names whose final stages results.md compares seed by seed (paired
  # differences with a 95% interval over seeds), e.g. ("P-Q-KD", "Q-P-KD").
  c.compare = ()
  # name -> stages, comma-separated, run in order on the trained teacher. Stage names: prune,
  # quantize, distill, finetune; "distill:small" distils into c.student, "distill" (or
  # "distill:inherit") into the running compressed model, keeping its constraints.
  c.pipelines = ml_collections.ConfigDict()
  return c
