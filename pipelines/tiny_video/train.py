"""Train the embedded tiny text-to-video model on the procedural data, on one GPU, from a seed.

    OUT=pipelines/tiny_video/weights
    python -m dit_accel.pipelines.tiny_video.train --out $OUT --seed 0 --phase vae --minutes 8
    python -m dit_accel.pipelines.tiny_video.train --out $OUT --seed 0 --phase vae-clips --minutes 3.5
    python -m dit_accel.pipelines.tiny_video.train --out $OUT --seed 0 --phase transformer

Three phases, each a run with its own wall-clock budget (``--minutes``, default 7.5, everything included) so
that each fits a 10-minute job, each starting from what the one before wrote to ``--out``; ``--phase all``
runs them in one process (``--vae-fraction`` and ``--vae-clips-fraction`` of the budget for the VAE phases).
After each VAE phase the VAE is rounded to bf16, as saved, so the three-run and one-run paths compute the same
thing.

1. VAE (``vae``): a fresh ``AutoencoderKLWan`` on 9-frame windows of full-length clips of every training
   geometry, cropped to 96 x 128 around the object (32 crops per step, lr 3e-4); loss: squared error with the
   object's pixels weighted 5x, + 1e-6 x KL (per element). ``vae-clips`` continues it on full-length clips
   (lr 1e-4): trained on windows alone it drifts in colour past the third latent frame of a 49-frame clip.
   Each ends with PSNR and prompt adherence of reconstructions of 49-frame clips in the log, and a PNG of four
   of them under their originals.
2. Transformer + text encoder: latents (posterior mean, normalised per channel with statistics measured at the
   start of the phase and stored in the VAE config as ``latents_mean`` / ``latents_std``, which is how
   WanPipeline un-normalises) of clips in the geometry buckets of the config; rectified flow:
   x_t = (1 - s) x_0 + s e, target e - x_0, timestep 1000 s, s = shift u / (1 + (shift - 1) u), u ~ U(0, 1),
   shift 3 (the scheduler's flow_shift); squared error weighted ``--object-weight`` (3) on the latent pixels
   the object touches, 1-5% of the latent, so that the object is not drowned out by the background it sits
   on (see :func:`latent_object_weights`). Captions are encoded exactly as
   ``WanPipeline._get_t5_prompt_embeds`` does (padded to the pipeline's max_sequence_length, embeddings past
   the prompt zeroed); 10% are replaced by "" for classifier-free guidance. Latents come from a ring-buffer
   pool per bucket: each clip is encoded once and drawn ``--reuse`` times on average, so the VAE encoder costs
   a quarter of what it would per step.
   AdamW, warm-up then cosine decay to 10%, grad-norm clip 1, bf16 autocast, EMA (0.998) weights are saved.

Step counts: after a few warm-up steps each phase times itself and fixes its number of steps to fill its share
of the budget; the learning-rate schedule depends only on that number. The log's ``reproduce`` line chains the
runs with ``--vae-steps``, ``--vae-clips-steps`` and ``--dit-steps`` fixed, which reproduces them step for
step (data, noise and initialisation all come from ``--seed``; GPU kernels are not bitwise deterministic).

Outputs in ``--out``: bf16 safetensors per component (the transformer in two shards of at most 15 MiB),
``tiny_video.json`` (configs, vocabulary, file list, training record) and ``train_log.json`` (loss curves,
timings); the VAE phases write only ``vae.safetensors``, their check PNG and the log, which the next phase
reads and extends.
``--smoke`` runs a few steps of everything on the CPU at toy sizes (CI).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from .data import sample_batch
from .model import DEFAULT_CONFIG, SMOKE_CONFIG, TinyVideoConfig, build_components, save_weights

__all__ = ["encode_prompts", "main", "parse_args"]

CFG_DROP = 0.1
OMIT_PROB = 0.2
KL_WEIGHT = 1e-6
PHASES = ("vae", "vae-clips", "transformer")
REQUIRES = {"vae-clips": "vae", "transformer": "vae-clips"}  # phase -> the run that must precede it
OBJECT_WEIGHT = 5.0  # VAE reconstruction loss on the object's pixels
DIT_OBJECT_WEIGHT = 3.0  # transformer loss on the latent pixels the object touches (--object-weight)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dit_accel.pipelines.tiny_video.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="folder for the safetensors, manifest and log")
    p.add_argument("--minutes", type=float, default=7.5, help="wall-clock budget of the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument(
        "--phase",
        choices=("all", *PHASES),
        default="all",
        help="all: every phase in one run; vae: train and save a fresh VAE on short windows; vae-clips: "
        "continue that VAE on full-length clips; transformer: train the rest on the VAE in --out (one run "
        "per phase, each with its own --minutes)",
    )
    p.add_argument(
        "--vae-fraction", type=float, default=0.3, help="share of the budget for --phase vae with --phase all"
    )
    p.add_argument(
        "--vae-clips-fraction",
        type=float,
        default=0.15,
        help="share of the budget for --phase vae-clips with --phase all",
    )
    p.add_argument("--vae-steps", type=int, help="fix the VAE step count (reproduce a logged run)")
    p.add_argument(
        "--vae-clips-steps", type=int, help="fix the vae-clips step count (reproduce a logged run)"
    )
    p.add_argument("--dit-steps", type=int, help="fix the transformer step count (reproduce a logged run)")
    p.add_argument(
        "--dit-total-steps",
        type=int,
        help="length of the transformer's learning-rate schedule across --resume runs (default: this run's)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --phase transformer: continue the transformer and text encoder saved in --out",
    )
    p.add_argument("--vae-batch", type=int, default=32, help="crops per VAE step")
    p.add_argument("--batch", type=int, default=32, help="clips per transformer step at the main geometry")
    p.add_argument("--vae-lr", type=float, default=3e-4)
    p.add_argument("--vae-clips-lr", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument(
        "--object-weight",
        type=float,
        default=DIT_OBJECT_WEIGHT,
        help="transformer loss weight on the latent pixels the object touches (1: a plain mean)",
    )
    p.add_argument("--reuse", type=int, default=4, help="mean number of times a pooled latent clip is drawn")
    p.add_argument("--pool", type=int, default=1024, help="latent clips pooled per geometry bucket")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--smoke", action="store_true", help="a few CPU steps at toy sizes (tests the script)")
    args = p.parse_args(argv)
    if args.resume and args.phase != "transformer":
        p.error("--resume continues a --phase transformer run")
    if args.smoke:
        args.device = args.device or "cpu"
        args.vae_steps = args.vae_steps or 3
        args.vae_clips_steps = args.vae_clips_steps or 2
        args.dit_steps = args.dit_steps or 4
        args.vae_batch, args.batch, args.pool, args.log_every = 2, 2, 4, 1
    args.device = args.device or "cuda"
    return args


def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], max_sequence_length: int, device
) -> torch.Tensor:
    """Prompt embeddings exactly as ``WanPipeline._get_t5_prompt_embeds`` makes them, with gradients."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    emb = text_encoder(ids, mask).last_hidden_state
    return emb * mask[..., None].to(emb.dtype)


class _Schedule:
    def __init__(self, base_lr: float, warmup: int):
        self.base_lr, self.warmup, self.total = base_lr, warmup, None

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.total is None:
            return self.base_lr
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class _Budget:
    """Fixes a phase's step count from its measured rate (or takes it from the command line)."""

    def __init__(self, fixed: int | None, seconds: float, warm: int, timed: int):
        self.total = fixed
        self.seconds, self.warm, self.timed = seconds, warm, timed
        self.t_start = time.perf_counter()
        self.t_warm = None

    def update(self, step: int, device) -> None:
        """Call once after each step with the number of steps done."""
        if self.total is not None:
            return
        if step == self.warm:
            _sync(device)
            self.t_warm = time.perf_counter()
        elif step == self.warm + self.timed:
            _sync(device)
            now = time.perf_counter()
            rate = (now - self.t_warm) / self.timed
            left = self.seconds - (now - self.t_start)
            self.total = max(step, step + int(left / rate))

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _fused(device) -> dict:
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def _autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _bucket_batches(config: TinyVideoConfig, batch: int) -> list[tuple[int, int, int, float, int]]:
    """(frames, height, width, weight, clips per step); smaller geometries take more clips, up to 4x."""
    f0, h0, w0, _ = config.geometries[0]
    out = []
    for f, h, w, weight in config.geometries:
        scale = min(4.0, (f0 * h0 * w0) / (f * h * w))
        out.append((f, h, w, weight, max(1, int(round(batch * scale)))))
    return out


def _pick(weights: list[float], g: torch.Generator) -> int:
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=g))


INIT_LOGVAR = -8.0


def start_posterior_narrow(vae) -> None:
    """Make the fresh VAE's posterior start narrow: log-variance INIT_LOGVAR everywhere (std 0.018).

    ``quant_conv`` maps the encoder output to [mean, logvar]. At default initialisation logvar is about 0: the
    sampled latent is unit noise around means of size ~0.2, and the decoder first learns to ignore it. With a
    KL weight this small nothing needs the width, so the VAE starts near the deterministic autoencoder it
    ends as.
    """
    z = vae.config.z_dim
    with torch.no_grad():
        vae.quant_conv.weight[z:].zero_()
        vae.quant_conv.bias[z:].fill_(INIT_LOGVAR)


VAE_STAGES = {
    # stage: (log key, generator seed offsets (data, noise), PNG written by its check)
    "windows": ("vae", (1, 4), "vae_check.png"),
    "clips": ("vae_clips", (7, 8), "vae_clips_check.png"),
}


def train_vae(vae, config: TinyVideoConfig, args, seconds: float, log: dict, stage: str = "windows") -> None:
    """One VAE stage. ``windows``: fresh VAE, ``config.vae_frames``-frame windows, ``--vae-batch`` crops per
    step, ``--vae-lr``. ``clips``: continue on full-length clips of every bucket (as many crops per step as
    give the same number of frames), ``--vae-clips-lr``: the causal VAE's receptive field spans far more than
    9 frames, and a VAE trained on windows alone reconstructs 9-frame clips at 35 dB but drifts in colour
    from the fourth latent frame of a 49-frame clip on (docs/tiny_model.md)."""
    key, (data_seed, noise_seed), png = VAE_STAGES[stage]
    device = args.device
    if stage == "windows":
        start_posterior_narrow(vae)
        lr, fixed = args.vae_lr, args.vae_steps
    else:
        lr, fixed = args.vae_clips_lr, args.vae_clips_steps
    vae.train().to(device)
    g = torch.Generator().manual_seed(args.seed * 1000 + data_seed)
    noise_g = torch.Generator(device).manual_seed(args.seed * 1000 + noise_seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0, **_fused(device))
    sched = _Schedule(lr, warmup=min(50, fixed or 50))
    budget = _Budget(fixed, seconds, warm=10, timed=20)
    weights = [geo[3] for geo in config.geometries]
    curve, acc, step, t0 = [], [], 0, time.perf_counter()
    while not budget.done(step):
        f, h, w, _ = config.geometries[_pick(weights, g)]
        frames = config.vae_frames if stage == "windows" else f
        n = max(1, round(args.vae_batch * config.vae_frames / frames))
        x = vae_clips(n, f, h, w, frames, g, device, crop=config.vae_crop)
        for group in opt.param_groups:
            group["lr"] = sched(step)
        with _autocast(device):
            post = vae.encode(x).latent_dist
            eps = torch.randn(post.mean.shape, generator=noise_g, device=device, dtype=post.mean.dtype)
            z = post.mean + post.std * eps
            rec = decode_unclamped(vae, z)
        err = (rec.float() - x).abs()
        w = object_weights(x)
        rec_loss = (w * err**2).mean(1, keepdim=True).sum() / w.sum()  # object-weighted MSE
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
        loss = rec_loss + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        obj = w > 1
        acc.append(
            (
                rec_loss.item(),
                kl.item(),
                err.mean().item(),
                (err.mean(1, keepdim=True) * obj).sum().item() / max(1, obj.sum().item()),
            )
        )
        step += 1
        budget.update(step, device)
        sched.total = budget.total
        if step % args.log_every == 0 or budget.done(step):
            r, k, plain, on_obj = (sum(a[i] for a in acc) / len(acc) for i in range(4))
            curve.append(
                {
                    "step": step,
                    "loss": r,
                    "l1": plain,
                    "l1_object": on_obj,
                    "kl": k,
                    "lr": sched(step - 1),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"[{key}] step {step}/{budget.total or '?'} loss {r:.4f} l1 {plain:.4f} "
                f"object l1 {on_obj:.4f} kl {k:.3f} ({time.perf_counter() - t0:.0f}s)"
            )
            acc = []
    seconds = time.perf_counter() - t0
    vae.eval()
    log[key] = {
        "steps": step,
        "seconds": seconds,
        "curve": curve,
        "check": reconstruction_check(vae, config, args, png=Path(args.out) / png),
    }
    print(f"[{key}] reconstruction check: {log[key]['check']}")


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z)`` before its final clamp to [-1, 1] (gradients flow where the output overshoots).

    ``AutoencoderKLWan`` decodes one latent frame per ``decoder`` call and clamps the concatenation. Trained
    on the clamped output, a pixel that overshoots gets no gradient at all: on a white or black background
    (0.92 / -0.92) an overshooting object pixel cannot recover. The decoder's own outputs, taken with a
    forward hook, are the same frames unclamped.
    """
    if vae.config.patch_size is not None:
        raise ValueError("decode_unclamped supports AutoencoderKLWan without patch_size (Wan 2.1's VAE)")
    frames = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: frames.append(out))
    try:
        vae.decode(z)
    finally:
        handle.remove()
    return torch.cat(frames, 2)


def vae_clips(
    n: int,
    clip_frames: int,
    height: int,
    width: int,
    frames: int,
    g,
    device,
    crop: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``frames`` consecutive frames (from a random start) of ``n`` clips rendered at ``clip_frames``, cut to
    ``crop`` = (height, width) around the object.

    Motion is defined over normalised clip time, so a clip rendered at 9 frames moves 6x faster per frame than
    the 49-frame clip the VAE will encode; windows of full-length clips show the real per-frame motion. A crop
    is centred on the object in the window's middle frame, shifted by up to a quarter of the crop each way and
    kept inside the frame, so the object is (nearly) always in it at its real pixel size.
    """
    batch = sample_batch(n, clip_frames, height, width, g, device=device, split="train")
    start = int(torch.randint(0, clip_frames - frames + 1, (1,), generator=g))
    video = batch.video[:, :, start : start + frames]
    ch, cw = crop if crop is not None else (height, width)
    if (ch, cw) == (height, width):
        return video.contiguous()
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} is larger than the {height}x{width} clips")
    jitter = torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5  # x, y in [-0.5, 0.5)
    centre = batch.centers[:, start + frames // 2].double()
    x0 = (centre[:, 0] - cw / 2 + jitter[:, 0] * cw / 2).round().clamp(0, width - cw).long().tolist()
    y0 = (centre[:, 1] - ch / 2 + jitter[:, 1] * ch / 2).round().clamp(0, height - ch).long().tolist()
    return torch.stack([video[i, :, :, y : y + ch, x : x + cw] for i, (x, y) in enumerate(zip(x0, y0))])


def object_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W]: OBJECT_WEIGHT on the object, 1 on the background.

    Every background is achromatic, so the object is where the target's channels differ. It covers 1-5% of a
    frame. The loss is a squared error so that the object's large errors outweigh the background's many small
    ones: under L1 every pixel pulls with the same force, and both a GPU run and a CPU overfit of two frames
    settled on the background and never drew the object. The weight makes the object come sooner.
    """
    return 1 + (OBJECT_WEIGHT - 1) * object_mask(x).to(x.dtype)


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] bool: the chromatic pixels of clips ``x`` [B, 3, F, H, W], which are the object's."""
    return (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) > 0.1


def latent_object_weights(video: torch.Tensor, latent_shape, weight: float) -> torch.Tensor:
    """Loss weights [B, 1, T, h, w] on the latent grid of ``video``: ``weight`` where a latent pixel's
    footprint holds any of the object, 1 elsewhere.

    Wan's VAE encodes frame 0 alone and each later latent frame from ``(F - 1) / (T - 1)`` frames, and each
    latent pixel from an ``H / h`` square; a latent pixel counts as object when any pixel of its footprint
    does. The weight shifts the optimum towards drawing the object where it may be (at a latent pixel the
    object covers with probability q the prediction weighs the object q w / (q w + 1 - q)): with the object
    at 1-5% of the latent the plain mean leaves it a few percent of the loss, and the sampler drew fragments.
    """
    t, h, w = latent_shape[-3:]
    frames, height, width = video.shape[-3:]
    st, ss = (frames - 1) // max(1, t - 1), height // h
    if 1 + (t - 1) * st != frames or h * ss != height or w * ss != width:
        raise ValueError(f"video {tuple(video.shape)} does not encode to a {t}x{h}x{w} latent")
    mask = object_mask(video).float()
    b = mask.shape[0]
    rest = mask[:, :, 1:].reshape(b, 1, t - 1, st, height, width).amax(3)
    mask = torch.cat([mask[:, :, :1], rest], 2).reshape(b, 1, t, h, ss, w, ss).amax((4, 6))
    return 1 + (weight - 1) * mask


@torch.no_grad()
def reconstruction_check(vae, config: TinyVideoConfig, args, clips: int = 8, png: Path | None = None) -> dict:
    """Per-frame PSNR (mean, capped at 100 dB) and prompt adherence of VAE reconstructions of fresh clips at
    the main geometry; ``png``: also save five frames of four clips, each clip's truth above its
    reconstruction."""
    from ..quality import psnr
    from .adherence import score_clips
    from .data import to_frames

    g = torch.Generator().manual_seed(args.seed * 1000 + 6)
    f, h, w, _ = config.geometries[0]
    batch = sample_batch(clips, f, h, w, g, device=args.device)
    with _autocast(args.device):
        rec = vae.decode(vae.encode(batch.video).latent_dist.mean).sample.float().clamp(-1, 1)
    truth, recon = to_frames(batch.video).cpu(), to_frames(rec).cpu()
    adherence = score_clips(list(recon), batch.captions)
    if png is not None:
        from PIL import Image

        picks = torch.linspace(0, f - 1, 5).round().long()
        pairs = [(truth[i], recon[i]) for i in range(min(4, clips))]
        rows = [torch.cat(list(clip[picks]), 1) for pair in pairs for clip in pair]
        strip = (torch.cat(rows, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(png)
    return {
        "psnr": float(torch.stack([psnr(t, r).clamp(max=100).mean() for t, r in zip(truth, recon)]).mean()),
        "adherence": {k: round(v, 3) for k, v in adherence["accuracy"].items()},
    }


@torch.no_grad()
def _encode_latents(vae, video, mean=None, std=None):
    z = vae.encode(video).latent_dist.mean.float()
    if mean is not None:
        z = (z - mean) / std
    return z


@torch.no_grad()
def latent_statistics(
    vae, config: TinyVideoConfig, args, batches: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the VAE's posterior means over clips of the main geometry."""
    g = torch.Generator().manual_seed(args.seed * 1000 + 2)
    f, h, w, _ = config.geometries[0]
    zs = []
    for _ in range(batches):
        video = sample_batch(max(2, args.batch // 4), f, h, w, g, device=args.device).video
        with _autocast(args.device):
            zs.append(_encode_latents(vae, video).transpose(0, 1).flatten(1))
    z = torch.cat(zs, 1)
    mean, std = z.mean(1), z.std(1)
    std = torch.maximum(std, 0.1 * std.median())  # a collapsed channel must not blow up the targets
    return mean, std


class _Pool:
    """Ring buffer of encoded clips for one geometry bucket."""

    def __init__(self, vae, geometry, size, args, mean, std, g):
        self.vae, self.args, self.g = vae, args, g
        self.frames, self.height, self.width, _, self.batch = geometry
        self.mean = mean.view(1, -1, 1, 1, 1).to(args.device)
        self.std = std.view(1, -1, 1, 1, 1).to(args.device)
        self.size, self.next, self.draws = size, 0, 0
        self.latents, self.weights, self.captions = None, None, [""] * size
        filled = 0
        while filled < size:
            n = min(self.batch, size - filled)
            self.refresh(n)
            filled += n

    def refresh(self, n):
        n = min(n, self.size)
        clips = sample_batch(
            n, self.frames, self.height, self.width, self.g, device=self.args.device, omit_prob=OMIT_PROB
        )
        with _autocast(self.args.device):
            z = _encode_latents(self.vae, clips.video, self.mean, self.std).to(torch.bfloat16)
        w = latent_object_weights(clips.video, z.shape, self.args.object_weight).to(torch.bfloat16)
        if self.latents is None:
            self.latents = torch.empty((self.size, *z.shape[1:]), dtype=torch.bfloat16, device=z.device)
            self.weights = torch.empty((self.size, *w.shape[1:]), dtype=torch.bfloat16, device=z.device)
        idx = [(self.next + i) % self.size for i in range(n)]
        self.latents[idx], self.weights[idx] = z, w
        for i, c in zip(idx, clips.captions):
            self.captions[i] = c
        self.next = (self.next + n) % self.size

    def draw(self):
        self.draws += 1
        if self.draws % self.args.reuse == 0:
            self.refresh(self.batch)
        idx = torch.randint(self.size, (self.batch,), generator=self.g)
        at = idx.to(self.latents.device)
        return self.latents[at].float(), self.weights[at].float(), [self.captions[i] for i in idx.tolist()]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)


def train_transformer(
    components, config: TinyVideoConfig, args, deadline: float, log: dict, start: int = 0
) -> dict:
    """Train the transformer and text encoder; returns their EMA copies.

    ``start`` > 0 continues a run that stopped after ``start`` steps (``--resume``): the weights in
    ``components`` are that run's saved (EMA) weights, the latent statistics are the ones stored in the VAE
    config, the optimizer is fresh with a warm-up of its own, and the learning rate follows the same schedule
    from step ``start`` on (``--dit-total-steps`` long).
    """
    device = args.device
    vae, transformer, text_encoder, tokenizer = (
        components["vae"],
        components["transformer"],
        components["text_encoder"],
        components["tokenizer"],
    )
    t0 = time.perf_counter()
    vae.eval().to(device)  # with --phase transformer it comes from disk, on the CPU
    if start:
        mean, std = torch.tensor(config.vae["latents_mean"]), torch.tensor(config.vae["latents_std"])
    else:
        mean, std = latent_statistics(vae, config, args)
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        config.vae["latents_mean"], config.vae["latents_std"] = mean.tolist(), std.tolist()

    g = torch.Generator().manual_seed(args.seed * 1000 + 3 + 10**6 * start)
    buckets = _bucket_batches(config, args.batch)
    pools = [
        _Pool(vae, b, args.pool if i == 0 else max(4, args.pool // 2), args, mean, std, g)
        for i, b in enumerate(buckets)
    ]
    pool_seconds = time.perf_counter() - t0

    transformer.train().to(device)
    text_encoder.train().to(device)
    ema = {
        "transformer": copy.deepcopy(transformer).eval(),
        "text_encoder": copy.deepcopy(text_encoder).eval(),
    }
    model = transformer
    if args.compile:
        model = torch.compile(transformer)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, **_fused(device))
    noise_g = torch.Generator(device).manual_seed(args.seed * 1000 + 5 + 10**6 * start)
    total_steps = args.dit_total_steps
    if total_steps is not None and total_steps <= start:
        raise SystemExit(f"--dit-total-steps {total_steps}: the run to resume already did {start} steps")
    sched = _Schedule(args.lr, warmup=min(100, args.dit_steps or 100))
    sched.total = total_steps
    budget = _Budget(args.dit_steps, deadline - time.perf_counter(), warm=10, timed=30)
    shift = float(config.scheduler.get("flow_shift", 3.0))
    weights = [b[3] for b in buckets]
    curve, acc, done, step, t1 = [], [], 0, start, time.perf_counter()
    while not budget.done(done) and (total_steps is None or step < total_steps):
        b = _pick(weights, g)
        x0, w, captions = pools[b].draw()
        drop = torch.rand(len(captions), generator=g) < CFG_DROP
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        u = torch.rand(len(captions), generator=g)
        sigma = (shift * u / (1 + (shift - 1) * u)).to(device)
        noise = torch.randn(x0.shape, generator=noise_g, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        # a resumed run's fresh optimizer warms up again, over the same number of steps
        lr = sched(step) * (min(1.0, (done + 1) / sched.warmup) if start else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(device):
            emb = encode_prompts(tokenizer, text_encoder, captions, config.max_sequence_length, device)
            pred = model(
                hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False
            )[0]
        err = (pred.float() - (noise - x0)) ** 2
        loss = (w * err).sum() / (w.sum() * err.shape[1])  # object-weighted mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema["transformer"], transformer, decay)
        _ema_update(ema["text_encoder"], text_encoder, decay)
        acc.append((loss.item(), gnorm.item(), b, lr))
        step, done = step + 1, done + 1
        budget.update(done, device)
        if total_steps is None and budget.total is not None:
            sched.total = start + budget.total
        if step % args.log_every == 0 or budget.done(done) or step == total_steps:
            mean_loss = sum(a[0] for a in acc) / len(acc)
            per_bucket = {
                str(k): sum(a[0] for a in acc if a[2] == k) / max(1, sum(a[2] == k for a in acc))
                for k in sorted({a[2] for a in acc})
            }
            curve.append(
                {
                    "step": step,
                    "loss": mean_loss,
                    "loss_by_bucket": per_bucket,
                    "grad_norm": sum(a[1] for a in acc) / len(acc),
                    "lr": acc[-1][3],
                    "seconds": time.perf_counter() - t1,
                }
            )
            print(
                f"[dit] step {step}/{sched.total or '?'} loss {mean_loss:.4f} "
                f"({time.perf_counter() - t1:.0f}s)"
            )
            acc = []
    log["transformer"] = {
        "steps": done,
        "first_step": start,
        "last_step": step,
        "schedule_steps": sched.total,
        "seconds": time.perf_counter() - t1,
        "pool_seconds": pool_seconds,
        "buckets": [list(b) for b in buckets],
        "latents_mean": mean.tolist(),
        "latents_std": std.tolist(),
        "curve": curve,
    }
    return ema


LOG = "train_log.json"


def _round_to_bf16(module: torch.nn.Module) -> None:
    """Round weights to bf16 in place (kept float32): the transformer learns the latents of the saved VAE."""
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(t.to(torch.bfloat16).float())


def _vae_config_key(vae_config: dict) -> dict:
    # latents_mean/std are measured by the transformer phase; every other key fixes the architecture
    return {k: v for k, v in vae_config.items() if k not in ("latents_mean", "latents_std")}


def save_vae_phase(vae, out: Path, log: dict) -> dict:
    """``--phase vae``: the VAE's bf16 safetensors and the log (no manifest: not a loadable model yet)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out / "vae.safetensors"), metadata={"format": "pt"})
    (out / LOG).write_text(json.dumps(log, indent=1))
    return {"vae.safetensors": (out / "vae.safetensors").stat().st_size}


def load_previous_run(vae, config: TinyVideoConfig, out: Path, phase: str) -> dict:
    """Load the VAE a ``--phase <phase>`` run saved in ``out``; returns that run's log."""
    from safetensors.torch import load_file

    path, log_path = out / "vae.safetensors", out / LOG
    if not path.is_file() or not log_path.is_file():
        raise SystemExit(f"{path} and {log_path} from a --phase {phase} run are needed first")
    previous = json.loads(log_path.read_text())
    if previous.get("phase") != phase:
        raise SystemExit(
            f"{log_path} is the log of a --phase {previous.get('phase')} run; run --phase {phase}"
        )
    if _vae_config_key(previous["vae_config"]) != _vae_config_key(config.vae):
        raise SystemExit(f"{path} was trained with another VAE config; rerun --phase vae")
    state = load_file(str(path))
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return previous


def load_transformer_run(components: dict, config: TinyVideoConfig, out: Path, previous: dict) -> int:
    """``--resume``: load the transformer and text encoder a ``--phase transformer`` run saved in ``out`` (its
    EMA weights, as shipped) and its latent statistics; ``previous`` is its log. Returns the step it stopped
    at."""
    from .model import load_tiny_video_pipeline

    pipe = load_tiny_video_pipeline(device="cpu", dtype=torch.float32, weights_dir=out)
    for name in ("transformer", "text_encoder"):
        components[name].load_state_dict(getattr(pipe, name).state_dict())
    stats = {k: pipe.vae.config[k] for k in ("latents_mean", "latents_std")}
    components["vae"].register_to_config(**stats)
    config.vae.update(stats)
    return int(previous["transformer"]["last_step"])


_RUN_KEYS = ("phase", "command", "args", "env", "total_seconds", "reproduce_run")


# log key -> (the phase that trains it, the flag that fixes its step count)
_STEP_FLAGS = {
    "vae": ("vae", "--vae-steps"),
    "vae_clips": ("vae-clips", "--vae-clips-steps"),
    "transformer": ("transformer", "--dit-steps"),
}


def _steps_flags(args, log) -> str:
    """The step-count flags that reproduce what this run trained."""
    return " ".join(
        f"{flag} {log[key]['steps']}"
        for key, (phase, flag) in _STEP_FLAGS.items()
        if key in log and args.phase in ("all", phase)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.minutes * 60
    config = copy.deepcopy(SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: the real run needs a GPU (use --smoke for a CPU check)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    components = build_components(config, seed=args.seed)
    out = Path(args.out)
    log = {
        "phase": args.phase,
        "command": " ".join(["python -m dit_accel.pipelines.tiny_video.train", *(argv or sys.argv[1:])]),
        "args": vars(args),
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "runs": [],  # the earlier phase runs this one builds on
    }
    start = 0
    if args.phase in REQUIRES:
        previous = load_previous_run(
            components["vae"], config, out, "transformer" if args.resume else REQUIRES[args.phase]
        )
        log["runs"] = [*previous["runs"], {k: previous[k] for k in _RUN_KEYS}]
        log.update({k: previous[k] for k in ("vae", "vae_clips") if k in previous})
        if args.resume:
            start = load_transformer_run(components, config, out, previous)
            log["transformer_runs"] = [*previous.get("transformer_runs", []), previous["transformer"]]
    budget = args.minutes * 60
    # each VAE stage ends rounded to bf16, as saved, so one --phase all run equals the three phase runs
    if args.phase in ("all", "vae"):
        share = args.vae_fraction if args.phase == "all" else 1
        train_vae(components["vae"], config, args, budget * share, log)
        _round_to_bf16(components["vae"])
    if args.phase in ("all", "vae-clips"):
        share = args.vae_clips_fraction if args.phase == "all" else 1
        train_vae(components["vae"], config, args, budget * share, log, stage="clips")
        _round_to_bf16(components["vae"])
    if args.phase in ("all", "transformer"):
        ema = train_transformer(components, config, args, deadline, log, start=start)
        components = {**components, **ema}
    flags = f"--out {args.out} --seed {args.seed}" + (" --smoke" if args.smoke else "")
    this_run = f"python -m dit_accel.pipelines.tiny_video.train {flags}"
    if args.phase != "all":
        this_run += f" --phase {args.phase}"
    this_run += " --resume" * args.resume + f" {_steps_flags(args, log)}"
    if args.dit_total_steps is not None and "transformer" in log:
        this_run += f" --dit-total-steps {args.dit_total_steps}"
    if "transformer" in log and args.object_weight != DIT_OBJECT_WEIGHT:
        this_run += f" --object-weight {args.object_weight}"
    log["reproduce_run"] = this_run
    log["reproduce"] = " && ".join([*(r["reproduce_run"] for r in log["runs"]), this_run])
    log["vae_config"] = config.vae
    log["total_seconds"] = time.perf_counter() - t_start
    if args.phase in ("vae", "vae-clips"):
        sizes = save_vae_phase(components["vae"], out, log)
        print(f"wrote {args.out}: {sizes} in {log['total_seconds']:.0f}s")
        return 0
    record = {
        "training": {
            "seed": args.seed,
            "steps": {
                "vae": log["vae"]["steps"],
                "vae_clips": log["vae_clips"]["steps"],
                "transformer": log["transformer"]["last_step"],
            },
            "total_seconds": log["total_seconds"] + sum(r["total_seconds"] for r in log["runs"]),
            "device": log["env"]["device"],
            "reproduce": log["reproduce"],
            "smoke": args.smoke,
        }
    }
    sizes = save_weights(args.out, components, config, extra=record)
    log["files"] = sizes
    (out / LOG).write_text(json.dumps(log, indent=1))
    print(f"wrote {args.out}: {sizes} ({sum(sizes.values()) / 1e6:.1f} MB) in {log['total_seconds']:.0f}s")
    print(f"reproduce: {log['reproduce']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
