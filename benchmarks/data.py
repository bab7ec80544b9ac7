"""Image-folder input speed and memory: kdpipe's paths vs a DataLoader baseline on the same files.

    .venv/bin/python benchmarks/data.py [--images 2000] [--epochs 3] [--workers 2] [--device cpu]

The data: scikit-learn digits upscaled to 64×64 RGB JPEG files in class folders (written once to a
temporary folder). Every path delivers the same training batches: resized (shorter side) and
center-cropped to 32×32, scaled to [0, 1], random crop with 4 pixels of padding and a horizontal flip
per sample, normalized; batch 128, `--workers` decoding processes.

  baseline     torchvision-style ImageFolder + DataLoader: PIL decode, resize and crop, to a float tensor,
               crop, flip and normalize per sample in the workers, every epoch (persistent workers, pinned
               on CUDA). torchvision itself needs the registry's torch build, which this project's CPU
               machines do not hold, so the baseline is the same steps written with PIL and torch.
  kdpipe memory   load_data (decode once into uint8 by the same number of workers), then train_batches:
               an index into the uint8 tensor, conversion and kornia augmentation batched on the device.
  kdpipe stream   storage: stream: DataLoader workers decode every epoch, kornia augments on the device.

Images per second are over the whole run (load included, `--epochs` epochs); the steady-state epoch
is reported too; all of it with and without the augmentation. Memory: the stored training data in memory, kdpipe's uint8 vs a float32 npz of the same
images read by kdpipe, and how much each fresh process's resident memory grew by loading (held data, after
collection; val and test are float in both).
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
from torch.utils.data import DataLoader, Dataset

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


class Baseline(Dataset):
    """What torchvision's ImageFolder with Resize, CenterCrop, ToTensor, RandomCrop(padding), RandomHorizontalFlip
    and Normalize does per sample, in the worker."""

    def __init__(self, root: Path, augment: bool):
        self.augment = augment
        classes = sorted(p.name for p in root.iterdir())
        self.samples = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = SIZE / min(image.size)
            image = image.resize((max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
            left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
            image = image.crop((left, top, left + SIZE, top + SIZE))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()).float() / 255
        if self.augment:
            x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
            dy, dx = np.random.randint(0, 2 * PAD + 1, size=2)
            x = x[:, dy:dy + SIZE, dx:dx + SIZE]
            if np.random.rand() < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, label


def run_baseline(root: Path, epochs: int, workers: int, device: torch.device, augment: bool) -> list[float]:
    loader = DataLoader(Baseline(root, augment), batch_size=BATCH, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    stamps = [time.perf_counter()]
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def run_kdpipe(root: Path, epochs: int, workers: int, device: torch.device, augment: bool, storage: str) -> list[float]:
    from kdpipe.config import DataConfig
    from kdpipe.data import load_data

    cfg = DataConfig(source="imagefolder", path=root, image_size=SIZE, channels=3, normalize={"mean": MEAN, "std": STD},
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


LOAD_AND_MEASURE = """
import gc, json, os, sys
from kdpipe.config import DataConfig
from kdpipe.data import load_data
import kdpipe.data.augment, PIL.Image, sklearn.datasets  # imports before the first reading

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cfg = DataConfig.model_validate(json.loads(sys.argv[1]))
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

        from kdpipe.config import DataConfig
        from kdpipe.data import load_data

        base = {"image_size": SIZE, "channels": 3, "val_fraction": 0.01, "test_fraction": 0.01, "workers": args.workers}
        float_copy = load_data(DataConfig(source="imagefolder", path=root, **base), seed=0)
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
