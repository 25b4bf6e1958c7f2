"""How much our reading costs over the bare decode, and what the decode cache saves, per transfer syntax.

In one run, on synthetic bitewings written in each transfer syntax the generator produces:
  * decode   - ``pydicom.dcmread(path).pixel_array``: the decode every reader must pay (the physical limit here);
  * ours     - ``caries_mim.io.read_radiograph(path)``: decode + header checks + modality/VOI/presentation;
  * cache    - ``caries_mim.data.DecodeCache.load(path)`` on a warm cache (hash the file, read the entry);
  * synth    - rendering one image and writing it (the generator's cost per image).
Prints a table, then a final JSON line.

    python benchmarks/decode_throughput.py [--images 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import torch

from caries_mim.data import DecodeCache
from caries_mim.io import read_radiograph
from caries_mim.synth import TRANSFER_SYNTAXES, SynthConfig, render_indexed, write_dicom


def median_ms(function: Callable[[Path], object], paths: list[Path], repeats: int) -> float:
    """Median over ``repeats`` passes of the mean milliseconds per file."""
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            function(path)
        passes.append((time.perf_counter() - started) * 1000 / len(paths))
    return statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="images per transfer syntax")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the readers are single-threaded; keep the comparison fair

    config = SynthConfig()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = DecodeCache(root / "cache")
        for syntax in TRANSFER_SYNTAXES:
            folder = root / syntax
            folder.mkdir()
            paths = []
            started = time.perf_counter()
            for index in range(args.images):
                image = render_indexed(0, "unlabeled", index, config)
                path = folder / f"{index}.dcm"
                write_dicom(image, path, index=index, seed=0, transfer_syntax=syntax, photometric="MONOCHROME2")
                paths.append(path)
            synth_ms = (time.perf_counter() - started) * 1000 / args.images
            for path in paths:  # warm the cache and the page cache
                cache.load(path)
            decode = median_ms(lambda p: pydicom.dcmread(p).pixel_array, paths, args.repeats)
            ours = median_ms(read_radiograph, paths, args.repeats)
            cached = median_ms(cache.load, paths, args.repeats)
            first = read_radiograph(paths[0])
            results[syntax] = {
                "size": f"{first.width}x{first.height}",
                "synth_ms": round(synth_ms, 1),
                "decode_ms": round(decode, 1),
                "ours_ms": round(ours, 1),
                "cache_hit_ms": round(cached, 1),
                "ours_over_decode": round(ours / decode, 2),
                "cache_speedup_over_ours": round(ours / cached, 1),
            }

    header = (
        f"{'transfer syntax':<28}{'synth':>9}{'decode':>9}{'ours':>9}{'cache':>9}{'ours/dec':>10}{'ours/cache':>12}"
    )
    print(header)
    for syntax, row in results.items():
        print(
            f"{syntax:<28}{row['synth_ms']:>7.1f}ms{row['decode_ms']:>7.1f}ms{row['ours_ms']:>7.1f}ms"
            f"{row['cache_hit_ms']:>7.1f}ms{row['ours_over_decode']:>9.2f}x{row['cache_speedup_over_ours']:>11.1f}x"
        )
    summary = {
        "benchmark": "decode_throughput",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "images_per_syntax": args.images,
        "per_syntax": results,
        "worst_ours_over_decode": max(r["ours_over_decode"] for r in results.values()),
        "min_cache_speedup": min(r["cache_speedup_over_ours"] for r in results.values()),
        "mean_synth_ms": round(statistics.mean(r["synth_ms"] for r in results.values()), 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
