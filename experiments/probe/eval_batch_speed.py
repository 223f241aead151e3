"""Forward-pass speed of `predict_logits` at several eval batch sizes on one thread (a benchmark
worker's), random images: is the per-epoch val pass batch-bound? Run alone:
`uv run python experiments/probe/eval_batch_speed.py`. Measured figures: results/evidence.md."""

import time

import torch

from shortcut_study.evaluate import predict_logits
from shortcut_study.model import CNN
from shortcut_study.runtime import resolve_runtime

rt = resolve_runtime("auto", "auto", True, 1)
print(torch.backends.cpu.get_cpu_capability(), rt.describe())
model = CNN().eval()
images = torch.randint(0, 256, (20000, 3, 40, 40), dtype=torch.uint8)
predict_logits(model, images[:2048], rt, 256)
for batch in (256, 128, 1024, 256, 128, 1024, 64, 512, 256):  # repeated: the first pass warms up
    start = time.perf_counter()
    predict_logits(model, images, rt, batch)
    print(f"eval batch {batch}: {len(images) / (time.perf_counter() - start):,.0f} images/s")
