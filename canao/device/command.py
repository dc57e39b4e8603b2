"""`canao device measure` (an artifact's latency on a device) and `canao device info` (what a device is)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEVICE_HELP = "local, ssh://user@host[:port][?key=PATH], adb[://SERIAL] or qemu-aarch64 (emulated) (default: local)"


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("device", help="run compiled artifacts on a device (this machine, ssh, adb)")
    dsub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")

    m = dsub.add_parser("measure", help="latency of an artifact on a device, timed there by its canao-run")
    m.add_argument("--artifact", required=True, help="artifact folder from `canao compile`")
    m.add_argument("--device", default="local", help=DEVICE_HELP)
    m.add_argument("--seq", type=int, default=128, help="tokens per input (batch 1)")
    m.add_argument("--runs", type=int, default=20, help="timed runs")
    m.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    m.add_argument("--timeout", type=float, default=600, help="seconds the device may take")
    add_common(m)
    m.set_defaults(func=cmd_measure)

    i = dsub.add_parser("info", help="a device's architecture, CPU and the canao target that fits it")
    i.add_argument("--device", default="local", help=DEVICE_HELP)
    add_common(i)
    i.set_defaults(func=cmd_info)


def cmd_measure(args) -> dict:
    from .device_runner import measure, measure_decode, read_manifest

    if read_manifest(Path(args.artifact)).get("kind") == "decoder":  # --seq is the context before decoding
        r = measure_decode(args.artifact, args.device, context=args.seq, threads=args.threads or 1,
                           steps=max(args.runs, 20), timeout=args.timeout)
        if not args.json:
            d = r["device"]
            print(f"{r['artifact']} (decoder, {r['target']}, {r['precision']}) on {d['spec']} ({d['arch']}):")
            print(f"  context {r['context']}, {r['threads']} thread(s): {r['tokens_per_s']:.1f} tokens/s "
                  f"(median {r['decode_ms_median']:.2f} ms/token, p90 {r['decode_ms_p90']:.2f}); time to first "
                  f"token for {r['ttft_prompt']} prompt tokens {r['ttft_ms_median']:.1f} ms")
        return r
    r = measure(args.artifact, args.device, seq=args.seq, threads=args.threads or 1, runs=args.runs,
                warmup=args.warmup, timeout=args.timeout)
    if not args.json:
        d = r["device"]
        print(f"{r['artifact']} ({r['target']}, {r['precision']}) on {d['spec']} "
              f"({d['arch']}, {d['cpu_model'] or 'unknown CPU'}):")
        print(f"  seq {r['seq']}, {r['threads']} thread(s), {r['runs']} runs after {r['warmup']} warm-up: "
              f"median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f}, p95 {r['p95_ms']:.3f}, "
              f"min {r['min_ms']:.3f}, mean {r['mean_ms']:.3f}")
    return r


def cmd_info(args) -> dict:
    from ..errors import CanaoError
    from .device_runner import device_target, get_device

    info = dict(get_device(args.device).probe())
    try:
        info["target"] = device_target(info)
    except CanaoError:
        info["target"] = None
    if not args.json:
        print(f"{info['spec']}: {info['arch']}, {info['cpu_model'] or 'unknown CPU'}, {info['cores']} cores"
              + (f", {info['product']}" if info["product"] else ""))
        print(f"  canao target: {info['target'] or 'none (canao cannot generate code for it)'}")
    info.pop("flags")
    return info
