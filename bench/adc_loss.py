"""The LMMSE receiver's SNR loss against the receiver ADC's bits, on the default channel.

Run: ``python bench/adc_loss.py [--frames 384] [--step 2] [--top 40] [--aware]`` (about 3
minutes on this project's 2-core CPU; 5.5 with ``--aware``). The channel is the
default wireless run's (``experiments/common.py``, "cpu" size: 16-QAM, 3GPP InF LOS
truncated to 4 taps, Clarke/Jakes Doppler at 200 Hz, L = 64 with an 8-symbol QPSK
preamble), with ``adc_bits`` = 0 (ideal samples), then 1..8 (AGC to the frame's RMS level,
the default Gaussian-MSE-optimal clip; `compressjax.channels.adc`). For each it draws the
study's evaluation frames (`wireless_measure.evaluation_set`: the same fixed key, so every
ADC sees the same symbols, channels and noise) at Es/N0 = 0, step, ..., top dB and runs the
study's classical references on them (`wireless_measure.references`: the LMMSE receiver
with the channel's mean tap powers as its prior and the thermal N0, unaware of the ADC;
perfect CSI beside it). The loss at SER t is the Es/N0 the receiver needs for SER t with
the ADC minus what it needs without (log-interpolated between points, `snr_summary`);
"floor" means the SER never reaches t up to ``top`` dB (its SER there is given).
``--aware`` adds a second table: the same receivers told N0 plus the ADC's error (the
Gaussian-input MSE at the frame's level), as a receiver that knows its ADC would be.

Precision: at SER 1e-2 the default 384 frames x 56 payload symbols per point give ~215
errors (+-7%, about 0.15 dB on the ideal curve's slope), but the frames are paired across
ADCs, so the differences are tighter: the 7- and 8-bit rows, whose true loss is ~0, read
within 0.1 dB of it.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import sys
import time


from compressjax import channels
from compressjax.studies import wireless_measure as wm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT = channels.ChannelConfig(**common.base_config("cpu").channel)
BITS = (0,) + tuple(range(1, channels.adc.MAX_BITS + 1))
RECEIVERS = ("lmmse", "perfect_csi")


def curves(channel: channels.ChannelConfig, plan: wm.EvalPlan, batches: list) -> dict:
  """The references' SER curves and Es/N0 at each `wm.SER_TARGETS` on ``batches``."""
  refs = wm.references(plan, channel, ("symbols",), batches)
  return {r: {"ser": refs["ser"][r], **refs["summary"][r]} for r in RECEIVERS}


def adc_aware(batches: list, ideal: list, bits: int) -> list:
  """``batches`` with N0 raised by the ADC's error, 2 rms^2 `adc.GAUSSIAN_MSE_DB`[b].

  rms is each frame's level before the ADC (the AGC measured it), read from ``ideal``,
  the same frames drawn without the ADC; the error is the Gaussian input's MSE.
  """
  mse = 10.0 ** (channels.adc.GAUSSIAN_MSE_DB[bits] / 10.0)
  out = []
  for b, i in zip(batches, ideal):
    iq = i["symbols"].iq
    rms2 = channels.agc_rms(iq[..., 0], iq[..., 1]) ** 2
    sym = b["symbols"]
    out.append({"symbols": sym._replace(noise_var=sym.noise_var + 2.0 * mse * rms2)})
  return out


def loss_db(with_adc: dict, ideal: dict, target: float) -> float | None:
  """Es/N0 at SER ``target`` with the ADC minus without it (None: not reached)."""
  key = f"snr_at_{target:.0e}"
  if with_adc[key] is None or ideal[key] is None:
    return None
  return with_adc[key] - ideal[key]


def _cell(value: float | None, ser_top: float) -> str:
  return f"floor ({ser_top:.3f})" if value is None else f"{value:+.2f}"


def _table(results: dict, ideal: dict, top: float, clip: bool) -> None:
  """One markdown row per ADC width: LMMSE's and perfect CSI's losses against ``ideal``."""
  print(f"| ADC bits |{' clip x RMS |' if clip else ''} LMMSE loss dB @ SER 1e-1 | LMMSE loss "
        f"dB @ SER 1e-2 | LMMSE SER @ {top:g} dB | perfect-CSI loss dB @ SER 1e-2 |")
  print("|---" * (6 if clip else 5) + "|")
  for b in BITS[1:]:
    lm, csi = results[b]["lmmse"], results[b]["perfect_csi"]
    print(f"| {b} |{f' {channels.adc.GAUSSIAN_CLIP[b]:.3f} |' if clip else ''} "
          f"{_cell(loss_db(lm, ideal['lmmse'], 1e-1), lm['ser_top'])} | "
          f"{_cell(loss_db(lm, ideal['lmmse'], 1e-2), lm['ser_top'])} | {lm['ser_top']:.2e} | "
          f"{_cell(loss_db(csi, ideal['perfect_csi'], 1e-2), csi['ser_top'])} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=384, help="frames per Es/N0 point")
  parser.add_argument("--step", type=float, default=2.0, help="Es/N0 grid step (dB)")
  parser.add_argument("--top", type=float, default=40.0, help="highest Es/N0 (dB)")
  parser.add_argument("--aware", action="store_true",
                      help="also run the references told N0 + the ADC's error (2x time)")
  args = parser.parse_args()
  points = tuple(args.step * i for i in range(int(round(args.top / args.step)) + 1))
  batch = min(args.frames, 384)
  if args.frames % batch:
    parser.error(f"--frames must be a multiple of {batch}, got {args.frames}")
  plan = wm.EvalPlan(snr_points=points, frames_per_point=args.frames, batch_size=batch,
                     latency_batch=1, latency_repeats=1, high_snr_db=points[-1])
  start = time.perf_counter()
  results, aware, ideal_set = {}, {}, None
  for b in BITS:
    channel = dataclasses.replace(DEFAULT, adc_bits=b)
    batches = wm.evaluation_set(plan, channel, ("symbols",))
    ideal_set = batches if b == 0 else ideal_set
    results[b] = curves(channel, plan, batches)
    if args.aware and b:
      aware[b] = curves(channel, plan, adc_aware(batches, ideal_set, b))
  ideal = results[0]
  print(f"Channel: {DEFAULT.modulation}, {DEFAULT.profile} ({DEFAULT.tap_count} taps), "
        f"Doppler {DEFAULT.doppler_hz:g} Hz, L = {DEFAULT.seq_len}, P = {DEFAULT.num_pilots}; "
        f"Es/N0 {points[0]:g}..{points[-1]:g} dB step {args.step:g}, {args.frames} frames "
        f"per point ({time.perf_counter() - start:.0f} s)")
  for r in RECEIVERS:
    print(f"  no ADC, {r}: Es/N0 @ SER 1e-1 = {ideal[r]['snr_at_1e-01']:.2f} dB, @ 1e-2 = "
          f"{ideal[r]['snr_at_1e-02']:.2f} dB, SER @ {points[-1]:g} dB = "
          f"{ideal[r]['ser_top']:.2e}")
  print()
  _table(results, ideal, points[-1], clip=True)
  if aware:
    print("\nTold N0 + the ADC's error (2 rms^2 x the Gaussian MSE at b bits):\n")
    _table(aware, ideal, points[-1], clip=False)


if __name__ == "__main__":
  main()
