"""Vision study: ResNet-18 teacher -> MobileNetV2 student, KD -> LoRA -> INT8.

The teacher, then ``stages`` in order (data: reorder them, drop some, or add the wireless
study's ``prune`` and ``quantize`` kinds): student (labels only, the baseline), distill
(Hinton KD, T=4, alpha=0.3), lora (adapters on the distilled student, merged), then
post-training INT8 of the weights, with activations in float / dynamic / static INT8;
see `compressjax.studies.vision`.

  # Default "cpu" size: scikit-learn's bundled digits at 16x16, small widths (minutes, 2 cores).
  python launch.py --config=experiments/vision_kd_lora_int8.py --workdir=runs/vision
  # Without the launcher:
  python -c "from experiments import vision_kd_lora_int8 as e; from compressjax.studies \
import vision as v; v.run(e.get_config(), 'runs/vision')"
  # "full": the published widths on CIFAR-100 (or --config.dataset=cifar10), a GPU budget.
  # The archive (cifar-100-python.tar.gz, python version) is from
  # https://www.cs.toronto.edu/~kriz/cifar.html; data_dir is the file or its directory.
  python launch.py --config=experiments/vision_kd_lora_int8.py:full \
      --config.data_dir=/data/cifar --workdir=runs/vision_full
"""

import ml_collections

SIZES = ("cpu", "full", "tiny")


def _stage(steps: int, optimizer: str, learning_rate: float, weight_decay: float,
           warmup_steps: int, **extra) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps, optimizer=optimizer, learning_rate=learning_rate,
      weight_decay=weight_decay, warmup_steps=warmup_steps, **extra))


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """Returns the study's config; ``size`` is one of `SIZES` ("tiny" is for tests)."""
  size = size or "cpu"
  if size not in SIZES:
    raise ValueError(f"config size must be one of {SIZES}, got {size!r}")
  full, tiny = size == "full", size == "tiny"
  c = ml_collections.ConfigDict()
  c.study = "vision"  # launch.py dispatches to compressjax.studies.vision.run
  c.size = size       # informational: results.md names it
  # Seeds: results.md shows each stage's mean ± std over them. The default runs three, as
  # one vmapped program (train.vmap_seeds); tiny (tests) and full run one.
  c.seeds = (0,) if tiny or full else (0, 1, 2)
  # The student's stages after the teacher, in order, each from the previous one's model:
  # student | distill | lora | prune | quantize (QAT at quantize.bits; quantize.steps=0 is
  # post-training) | ptq:weights | ptq:dynamic | ptq:static (post-training INT8 weights,
  # activations float / quantized per input / on calibrated ranges).
  # The default adds 30% magnitude pruning (KD fine-tuned) before INT8: with the sparse
  # export it takes the student below a tenth of the teacher's bytes.
  c.stages = ("student,distill,lora,ptq:weights,ptq:dynamic,ptq:static" if tiny else
              "student,distill,lora,prune,ptq:weights,ptq:dynamic,ptq:static")
  # Pass marks of the final stage against the teacher, printed in results.md:
  # (label, accuracy ratio >=, fraction of exported bytes saved >=).
  c.targets = (("bar", 0.97, 0.90), ("thesis floor", 0.90, 0.75))

  # Data: "digits" (bundled with scikit-learn, no download), "cifar10", "cifar100",
  # "cifar100_coarse". CIFAR needs data_dir; digits needs none.
  c.dataset = "cifar100" if full else "digits"
  c.data_dir = ""
  c.split_seed = 0          # seed of the train/validation (and digits' test) split
  c.num_val = 5000 if full else 180   # validation images taken from the training set
  c.num_test = 360          # digits only: held-out test images (CIFAR has its test set)
  c.image_size = 32 if full else (8 if tiny else 16)  # digits are upsampled 8x8; CIFAR: 32
  # Random crop with zero padding and horizontal flips (He et al., 2016); no flips for digits.
  c.augment = ml_collections.ConfigDict(dict(padding=4 if full else (1 if tiny else 2),
                                             flip=full))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=128 if full else (16 if tiny else 64),
      eval_every=1000 if full else (20 if tiny else 50),  # steps between validations
      log_every=200 if full else (20 if tiny else 25),
      num_devices=0,  # data parallelism over this many devices (0 = every device JAX sees)
      checkpoint_every=0 if tiny else 100,  # steps between resumable checkpoints (0: none)
      keep_checkpoints=2,
      max_nonfinite=20,   # consecutive skipped non-finite steps that stop a run
      vmap_seeds=not (tiny or full),   # train all seeds as one vmapped program
      # float32 | bfloat16 (accelerators: params and optimizer state stay float32)
      compute_dtype="float32",
  ))
  # Steps per epoch: 45,000 / 128 = 351 on CIFAR; 1,257 / 64 = 19 on digits.
  # Teacher: ResNet-18, CIFAR variant; width 64 is the published model (11.2M parameters).
  c.teacher = _stage(
      70200 if full else (60 if tiny else 400),            # full: 200 epochs
      "sgd" if full else "adam", 0.1 if full else 3e-3, 5e-4 if full else 0.0,
      1755 if full else (0 if tiny else 20),
      width=64 if full else (8 if tiny else 16),
      stage_sizes=(1, 1) if tiny else (2, 2, 2, 2))   # tiny: two one-block stages
  # Student: MobileNetV2, CIFAR variant (2.2M parameters at x1.0 and 10 classes). stages None
  # is Sandler et al.'s table; tiny uses two short stages to compile fast.
  student_model = dict(
      width_multiplier=1.0 if full else 0.25,
      stages=((1, 16, 1, 1), (6, 24, 1, 2)) if tiny else None,
      # "auto": shifted sums on CPU (XLA:CPU's grouped conv is 5-80x slower per depthwise
      # layer, bench/vision_served.py), grouped conv elsewhere; tiny: "conv" (compiles faster).
      depthwise_impl="conv" if tiny else "auto")
  c.student = _stage(70200 if full else (60 if tiny else 400), "adam", 1e-3 if full else 3e-3,
                     5e-2 if full else 0.0, 1755 if full else (0 if tiny else 20),
                     **student_model)
  # Distillation into the student's architecture, from the student's initialization
  # (init="scratch") or from the previous stage's model (init="previous": the baseline).
  c.distill = _stage(70200 if full else (60 if tiny else 400), "adam", 1e-3,
                     5e-2 if full else 0.0, 1755 if full else (0 if tiny else 20),
                     temperature=4.0,
                     alpha=0.3,         # weight of the soft-target term (Hinton et al., 2015)
                     init="scratch" if full else "previous")  # scratch | previous
  # LoRA on the distilled student: rank-r adapters on its conv/dense kernels (never the
  # depthwise ones, nor kernels narrower than r), trained alone, then merged.
  c.lora = _stage(5000 if full else (20 if tiny else 150), "adam", 1e-3 if full else 5e-4, 0.0,
                  0,
                  rank=8 if full else 4, alpha=16.0 if full else 8.0,
                  bn="frozen",          # frozen: BN in inference mode | update: batch stats
                  loss="kd",            # kd: the distillation loss again | ce: labels only
                  classifier=True)      # adapt the classifier too (if rank fits)
  # Pruning (the "prune" stage): pruning.wrap's settings, fine-tuned with the KD loss.
  c.prune = _stage(20 if tiny else 150, "adam", 5e-4, 0.0, 0, loss="kd",
                   sparsity=0.5 if tiny else 0.3, score="magnitude", structure="unstructured",
                   scope="layer",
                   schedule="polynomial")
  # Quantization: the "quantize" stage's QAT (steps, optimizer, loss) and the bits, weight
  # and activation quantizers that it and the "ptq:*" stages use.
  c.quantize = _stage(
      20 if tiny else 150, "adam", 2e-4, 0.0, 0, loss="kd",
      bits=8,
      granularity="channel",    # weights: one scale per output channel | tensor
      weight_method="minmax",   # weight grid: minmax | percentile | mse | pow2 | registered
      act_symmetric=False,      # activations: unsigned with a zero point (post-ReLU6 >= 0)
      calib_method="minmax",    # activation grid: minmax | percentile | mse | registered
      calib_batches=2 if tiny else 8,   # training batches (no augmentation) to calibrate on
      skip_depthwise=False,     # keep depthwise kernels in float
  )
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=64 if tiny else 256,
      latency_batch=64 if tiny else 1,   # tiny: the eval batch, so nothing compiles twice
      latency_repeats=2 if tiny else 20,
  ))
  return c
