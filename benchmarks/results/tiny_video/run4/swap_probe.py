"""How much the embedded model's loss depends on each caption attribute (CPU, a few minutes).

Object-weighted flow-matching loss (as in training) on 12 fresh 17 x 96 x 128 clips at three noise levels,
with the true caption against the caption with one attribute replaced by each other value (mean relative
increase) and against the empty caption. Output: swap_probe.json next to this file.
"""

import json
from pathlib import Path

import torch

from dit_accel.pipelines.tiny_video.data import COLOURS, MOTIONS, SHAPES, caption, sample_batch
from dit_accel.pipelines.tiny_video.model import load_tiny_video_pipeline
from dit_accel.pipelines.tiny_video.train import encode_prompts, latent_object_weights

pipe = load_tiny_video_pipeline("cpu", dtype=torch.float32)
vae, transformer = pipe.vae, pipe.transformer
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
g = torch.Generator().manual_seed(11)
batch = sample_batch(12, 17, 96, 128, g)
result = {}
with torch.no_grad():
    x0 = (vae.encode(batch.video).latent_dist.mean - mean) / std
    w = latent_object_weights(batch.video, x0.shape, 3.0)

    def loss(captions, xt, sigma, noise):
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions, 512, "cpu")
        t = torch.full((len(captions),), sigma * 1000.0)
        v = transformer(hidden_states=xt, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        err = (v - (noise - x0)) ** 2
        return (w * err).sum((1, 2, 3, 4)) / (w.sum((1, 2, 3, 4)) * err.shape[1])

    for sigma in (0.3, 0.6, 0.85):
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - sigma) * x0 + sigma * noise
        true = loss(batch.captions, xt, sigma, noise)
        row = {"true": true.mean().item()}
        for name, values in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS)):
            ups = []
            for k in range(1, len(values)):
                labels = {key: v.clone() for key, v in batch.labels.items()}
                labels[name] = (labels[name] + k) % len(values)
                swapped = [caption(labels, i) for i in range(len(batch.captions))]
                ups.append((loss(swapped, xt, sigma, noise) / true - 1).mean().item())
            row[name] = sum(ups) / len(ups)
        row["empty"] = (loss([""] * len(batch.captions), xt, sigma, noise) / true - 1).mean().item()
        result[sigma] = row
        print(sigma, {k: round(v, 4) for k, v in row.items()}, flush=True)
(Path(__file__).parent / "swap_probe.json").write_text(json.dumps(result, indent=1))
