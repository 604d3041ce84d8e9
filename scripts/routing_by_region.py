"""How a bundle's MoLRE router uses its experts along the head, measured on fresh phantoms.

For N phantoms (seed ``--seed``, every renderable finding at prevalence 0.1) the bundle's router weights
per valid slice are collected (``inference.predict``); printed: the mean usage of each expert, the
router entropy, and for each band of slices (skull base to vertex) the share of slices whose dominant
expert (argmax of the gates) is each expert. Used for docs/comparison.md's routing description::

    .venv/bin/python scripts/routing_by_region.py --model Resources/Models/demo --n 30
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HeadCTMoLRE"))


def main(argv=None) -> int:
    import numpy as np

    from HeadCTMoLRELib import inference
    from HeadCTMoLRELib.ct.loader import CTVolume
    from HeadCTMoLRELib.phantoms import generate_phantom

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Resources/Models/demo", help="model bundle with MoLRE")
    parser.add_argument("--n", type=int, default=30, help="phantoms (default 30)")
    parser.add_argument("--seed", type=int, default=4242, help="first phantom seed (default 4242)")
    parser.add_argument("--bands", type=int, default=5, help="bands of slices from skull base to vertex (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    gates, slice_index = [], []
    for k in range(args.n):
        volume = CTVolume(image=generate_phantom(None, args.seed + k).image, provenance={"format": "phantom"})
        prediction = inference.predict(volume, args.model, device="cpu")
        if prediction.router_weights is None:
            raise SystemExit(f"{args.model} has no MoLRE router (a LoRA-only bundle)")
        valid = np.flatnonzero(prediction.slice_valid)
        gates.append(prediction.router_weights[valid])
        slice_index.append(valid)
        slices = len(prediction.slice_valid)
    gates, slice_index = np.concatenate(gates), np.concatenate(slice_index)
    experts = gates.shape[1]
    dominant = gates.argmax(axis=1)
    entropy = float(-(gates * np.log(np.clip(gates, 1e-12, None))).sum(axis=1).mean())
    edges = np.linspace(0, slices, args.bands + 1)
    bands = []
    for b in range(args.bands):
        inside = (slice_index >= edges[b]) & (slice_index < edges[b + 1])
        share = np.bincount(dominant[inside], minlength=experts) / max(1, inside.sum())
        bands.append({"slices": [int(math.ceil(edges[b])), int(math.ceil(edges[b + 1])) - 1],
                      "n": int(inside.sum()), "dominant_share": [round(float(s), 3) for s in share]})
    result = {"model": str(args.model), "phantoms": args.n, "seed": args.seed, "valid_slices": int(len(gates)),
              "mean_usage": [round(float(u), 3) for u in gates.mean(axis=0)],
              "dominant_share": [round(float(s), 3) for s in np.bincount(dominant, minlength=experts) / len(dominant)],
              "experts_dominant_on_5pct": int((np.bincount(dominant, minlength=experts) / len(dominant) >= 0.05).sum()),
              "router_entropy": round(entropy, 3), "max_entropy": round(math.log(experts), 3), "bands": bands}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.model}: {args.n} phantoms, {len(gates)} valid slices; router entropy {entropy:.2f} of "
          f"{math.log(experts):.2f}")
    print("mean usage     " + " ".join(f"{u:5.2f}" for u in result["mean_usage"]))
    print("dominant share " + " ".join(f"{u:5.2f}" for u in result["dominant_share"]))
    for band in bands:
        print(f"slices {band['slices'][0]:2d}-{band['slices'][1]:2d} (n={band['n']:4d}) dominant "
              + " ".join(f"{u:5.2f}" for u in band["dominant_share"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
