"""Peak memory and time of autoencoder encoding + decoding, whole volume vs tiles.

Each case runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its
own: the parent prints one table with the tiled cases' memory and time as a ratio of the
whole-volume reference measured in the same run. Memory and time do not depend on the
weights' values, so the autoencoder is built with its preset's architecture and random
weights unless ``--checkpoint`` names a trained one.

    python pipelines/benchmark_tiling.py                         # 1 mm brain, small preset
    python pipelines/benchmark_tiling.py --shape 512 512 128 --preset small --tile 64

A 1 mm whole-brain MNI volume is 182 x 218 x 182; it is padded up to the autoencoder's
multiple (184 x 220 x 184 for a 4x autoencoder), as medidiff's preprocessing does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(args: argparse.Namespace) -> dict:
    import torch

    from medidiff.models.autoencoder import (
        autoencoder_kwargs,
        build_autoencoder,
        decode_tiled,
        downsample_factor,
        encode_tiled,
    )

    torch.set_num_threads(args.threads)
    kwargs = autoencoder_kwargs(3, args.preset)
    ae = build_autoencoder(kwargs).eval()
    f = downsample_factor(kwargs)
    shape = [s + (-s) % f for s in args.shape]
    x = torch.rand(1, 1, *shape)
    tile = None if args.tile[0] == 0 else args.tile[0]
    latent_tile = None if tile is None else max(1, tile // f)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    z = encode_tiled(ae, x, tile=tile, overlap=args.overlap)
    t1 = time.perf_counter()
    y = decode_tiled(ae, z, tile=latent_tile, overlap=args.overlap)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "shape": shape, "latent": list(z.shape[1:]), "tile": tile or "whole",
        "encode_s": t1 - t0, "decode_s": t2 - t1, "peak_gb": peak / 2**20,
        "above_start_gb": (peak - base) / 2**20, "out_ok": list(y.shape[2:]) == shape,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[182, 218, 182], help="volume size in voxels")
    p.add_argument("--preset", default="small", help="autoencoder preset (default: small)")
    p.add_argument("--tile", type=int, nargs="+", default=[0, 96, 64],
                   help="tile edges in voxels to compare; 0 = whole volume (the reference)")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_one(args)))
        return 0
    rows = []
    for tile in args.tile:
        cmd = [sys.executable, __file__, "--_child", "--shape", *map(str, args.shape), "--preset", args.preset,
               "--tile", str(tile), "--overlap", str(args.overlap), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"tile {tile or 'whole'}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["tile"] == "whole"), None)
    print(f"autoencoder preset {args.preset}, volume {rows[0]['shape'] if rows else args.shape}, "
          f"{args.threads} thread(s), overlap {args.overlap}")
    print("| tile | latent | encode s | decode s | peak RSS GB | vs whole (memory) | vs whole (time) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["encode_s"] + r["decode_s"]
        mem_ratio = f"{r['peak_gb'] / ref['peak_gb']:.2f}x" if ref else "-"
        time_ratio = f"{total / (ref['encode_s'] + ref['decode_s']):.2f}x" if ref else "-"
        print(f"| {r['tile']} | {'x'.join(map(str, r['latent']))} | {r['encode_s']:.1f} | {r['decode_s']:.1f} "
              f"| {r['peak_gb']:.2f} | {mem_ratio} | {time_ratio} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
