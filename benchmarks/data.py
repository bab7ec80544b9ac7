"""Image-folder input speed and memory: kdpipe's paths vs a DataLoader baseline on the same files.

    .venv/bin/python benchmarks/data.py [--images 2000] [--epochs 3] [--workers 2] [--device cpu]

(the baseline needs torchvision: the `vision` extra)

The data: scikit-learn digits upscaled to 64×64 RGB JPEG files in class folders (written once to a
temporary folder). Every path delivers the same training batches: resized (shorter side) and
center-cropped to 32×32, scaled to [0, 1], random crop with 4 pixels of padding and a horizontal flip
per sample, normalized; batch 128, `--workers` decoding processes.

  baseline     torchvision's ImageFolder + DataLoader, transforms.v2 per sample in the workers, every
               epoch: Resize (shorter side), CenterCrop, RandomCrop(padding), RandomHorizontalFlip,
               PILToTensor, ToDtype(float32, scale), Normalize (persistent workers, pinned on CUDA).
  kdpipe memory   load_data (decode once into uint8 by the same number of workers), then train_batches:
               an index into the uint8 tensor, conversion and kornia augmentation batched on the device.
  kdpipe stream   storage: stream: DataLoader workers decode every epoch, kornia augments on the device.

Images per second are over the whole run (load included, `--epochs` epochs); the steady-state epoch
is reported too; all of it with and without the augmentation. `transforms_max_abs_diff`: the largest
difference between the baseline's and kdpipe's unaugmented inputs for the same files (the eval
transforms are the same when it is ~1e-7). `profile_ms_per_batch`: where an in-memory augmented
batch's time goes in this process (gather and convert, augmentation, normalization). Memory: the
stored training data in memory, kdpipe's uint8 vs a float32 npz of the same images read by kdpipe, and
how much each fresh process's resident memory grew by loading (held data, after collection; val and
test are float in both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

SIZE, PAD, BATCH = 32, 4, 128
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def write_images(root: Path, count: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        k = i % len(digits.images)
        grey = Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
        path = root / f"class{digits.target[k]}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.merge("RGB", [grey, grey.rotate(90), grey.rotate(180)]).save(path, quality=90)
    return root


def baseline_transform(augment: bool):
    from torchvision.transforms import v2

    crop_and_flip = [v2.RandomCrop(SIZE, padding=PAD), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([v2.Resize(SIZE), v2.CenterCrop(SIZE), *crop_and_flip, v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def run_baseline(root: Path, epochs: int, workers: int, device: torch.device, augment: bool) -> list[float]:
    from torchvision.datasets import ImageFolder

    loader = DataLoader(ImageFolder(str(root), transform=baseline_transform(augment)), batch_size=BATCH, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    stamps = [time.perf_counter()]
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def run_kdpipe(root: Path, epochs: int, workers: int, device: torch.device, augment: bool, storage: str) -> list[float]:
    from kdpipe.data.sources import data_config
    from kdpipe.data import load_data

    cfg = data_config(source="imagefolder", path=root, image_size=SIZE, channels=3, normalize={"mean": MEAN, "std": STD},
                     augment=[{"random_crop": {"padding": PAD}}, "hflip"] if augment else [], storage=storage, workers=workers,
                     val_fraction=0.01, test_fraction=0.01, batch_size=BATCH)
    stamps = [time.perf_counter()]
    splits = load_data(cfg, seed=0, device=device).to(device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for index, x, y in splits.train_batches(BATCH, generator):
            pass
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(stamps: list[float], images: int) -> dict[str, float]:
    epochs = len(stamps) - 1
    steady = min(b - a for a, b in zip(stamps[1:], stamps[2:])) if epochs > 1 else stamps[1] - stamps[0]
    return {"images_per_s": round(images * epochs / (stamps[-1] - stamps[0]), 1),
            "steady_epoch_images_per_s": round(images / steady, 1), "seconds": round(stamps[-1] - stamps[0], 2)}


def transforms_max_abs_diff(root: Path, count: int = 64) -> float:
    """Largest difference between the baseline's unaugmented inputs and kdpipe's decoding and conversion of the
    same files: how far the two eval transforms are from each other."""
    from torchvision.datasets import ImageFolder

    from kdpipe.data.images import Decoder
    from kdpipe.data.splits import InputConversion

    folder = ImageFolder(str(root), transform=baseline_transform(False))
    decode, convert = Decoder(3, (SIZE, SIZE)), InputConversion(255.0, tuple(MEAN), tuple(STD))
    worst = 0.0
    for i in range(min(count, len(folder))):
        ours = convert(torch.from_numpy(decode(folder.samples[i][0], str(i))[None].copy()))[0]
        worst = max(worst, float((folder[i][0] - ours).abs().max()))
    return worst


def profile_batches(root: Path, workers: int, device: torch.device) -> dict[str, float]:
    """ms per batch of one in-memory augmented epoch, step by step, as train_batches takes them."""
    from kdpipe.data.sources import data_config
    from kdpipe.data import load_data

    cfg = data_config(source="imagefolder", path=root, image_size=SIZE, channels=3, normalize={"mean": MEAN, "std": STD},
                     augment=[{"random_crop": {"padding": PAD}}, "hflip"], storage="memory", workers=workers,
                     val_fraction=0.01, test_fraction=0.01, batch_size=BATCH)
    splits = load_data(cfg, seed=0, device=device).to(device)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(splits.y_train), generator=generator).to(device)
    spent = {"gather_and_convert": 0.0, "augment": 0.0, "normalize": 0.0}
    batches = 0
    for start in range(0, len(order), BATCH):
        stamps = [time.perf_counter()]
        x = splits.conversion.unit(splits.x_train[order[start:start + BATCH]])
        sync(device)
        stamps.append(time.perf_counter())
        x = splits.augmentation(x, generator)
        sync(device)
        stamps.append(time.perf_counter())
        splits.conversion.normalize(x)
        sync(device)
        stamps.append(time.perf_counter())
        for name, a, b in zip(spent, stamps, stamps[1:]):
            spent[name] += b - a
        batches += 1
    return {name: round(seconds / batches * 1e3, 2) for name, seconds in spent.items()}


LOAD_AND_MEASURE = """
import gc, json, os, sys
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
import kdpipe.data.augment, PIL.Image, sklearn.datasets  # imports before the first reading

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cfg = data_config(**json.loads(sys.argv[1]))
gc.collect()
before = resident()
splits = load_data(cfg, seed=0)
gc.collect()
print(json.dumps({"stored_train_bytes": splits.x_train.nbytes, "dtype": str(splits.x_train.dtype),
                  "resident_growth_bytes": resident() - before}))
"""


def measure_memory(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, json.dumps(cfg)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_images(Path(tmp) / "images", args.images)
        results = {"images": args.images, "epochs": args.epochs, "workers": args.workers, "device": str(device),
                   "torch_threads": torch.get_num_threads()}
        # Interleaved, each twice; the faster run of each is kept (other processes only ever add time).
        for augment in (True, False):
            runs: dict[str, list[dict]] = {"baseline": [], "kdpipe_memory": [], "kdpipe_stream": []}
            for _ in range(2):
                runs["baseline"].append(rates(run_baseline(root, args.epochs, args.workers, device, augment), args.images))
                for storage in ("memory", "stream"):
                    stamps = run_kdpipe(root, args.epochs, args.workers, device, augment, storage)
                    runs[f"kdpipe_{storage}"].append(rates(stamps, args.images))
            variant = results["augmented" if augment else "not_augmented"] = {}
            for name, found in runs.items():
                variant[name] = max(found, key=lambda r: r["images_per_s"])
            for name in ("kdpipe_memory", "kdpipe_stream"):
                variant[f"{name}_vs_baseline"] = round(variant[name]["images_per_s"] / variant["baseline"]["images_per_s"], 2)

        results["transforms_max_abs_diff"] = transforms_max_abs_diff(root)
        results["profile_ms_per_batch"] = profile_batches(root, args.workers, device)

        from kdpipe.data.sources import data_config
        from kdpipe.data import load_data

        base = {"image_size": SIZE, "channels": 3, "val_fraction": 0.01, "test_fraction": 0.01, "workers": args.workers}
        float_copy = load_data(data_config(source="imagefolder", path=root, **base), seed=0)
        npz = Path(tmp) / "images-float32.npz"
        np.savez(npz, x=np.concatenate([float_copy.to_input(float_copy.x_train).numpy(), float_copy.x_val.numpy(),
                                        float_copy.x_test.numpy()]),
                 y=np.concatenate([float_copy.y_train.numpy(), float_copy.y_val.numpy(), float_copy.y_test.numpy()]))
        uint8 = measure_memory({"source": "imagefolder", "path": str(root), "storage": "memory", **base})
        float32 = measure_memory({"source": "npz", "path": str(npz), "val_fraction": 0.01, "test_fraction": 0.01})
        results["memory"] = {"kdpipe_uint8": uint8, "float32_npz": float32,
                             "stored_train_ratio": round(uint8["stored_train_bytes"] / float32["stored_train_bytes"], 3),
                             "resident_growth_ratio": round(uint8["resident_growth_bytes"] / float32["resident_growth_bytes"], 3)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
