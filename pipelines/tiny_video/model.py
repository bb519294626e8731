"""The embedded text-to-video model: configs, the offline tokenizer, a real ``WanPipeline`` built from them,
and loading/saving its safetensors weights.

Components (all stock diffusers/transformers classes, built from configs, nothing fetched):

- ``AutoencoderKLWan``: base_dim 16, dim_mult (1, 2, 4), z_dim 16 -> 4x temporal, 4x spatial (1.9M params).
  Wan 2.1's VAE compresses 8x spatially; at this size and training budget an 8x VAE never learned to draw
  the object (docs/tiny_model.md). At 4x each latent carries 12x fewer pixel values instead of 48x, and the
  transformer's 4x4 patches keep the token count of 8x latents with 2x2 patches.
- ``WanTransformer3DModel``: 6 layers, 6 heads x 64, ffn 1152, patch (1, 4, 4), text_dim 128 (~14.0M params).
- ``UMT5EncoderModel`` (what Wan uses): d_model 128, 2 layers, 4 heads, vocabulary = the grammar's words.
- A word-level ``PreTrainedTokenizerFast`` built in memory (pad 0, eos 1, unk 2, then the words).
- ``UniPCMultistepScheduler`` in flow-matching mode (flow_shift 3), Wan 2.1's scheduler in diffusers.

Training geometry 49 frames x 192 x 256 -> latents 13 x 48 x 64 -> 13 x 12 x 16 = 2,496 tokens (192 per frame,
not a multiple of 128, like every real video geometry in DESIGN.md §5). A CPU render of 17 x 96 x 128 is
5 x 6 x 8 = 240 tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cpu_vae import speed_up_vae
from .data import vocabulary

__all__ = [
    "DEFAULT_CONFIG",
    "MANIFEST",
    "SMOKE_CONFIG",
    "TRAIN_COMMAND",
    "TRAIN_RUNS",
    "TinyVideoConfig",
    "WEIGHTS_DIR",
    "WeightsNotFoundError",
    "build_components",
    "build_pipeline",
    "build_tokenizer",
    "load_tiny_video_pipeline",
    "render_defaults",
    "save_weights",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "tiny_video.json"
COMPONENTS = ("vae", "transformer", "text_encoder")
_TRAIN = "python -m dit_accel.pipelines.tiny_video.train --out pipelines/tiny_video/weights --seed 0"
# The runs that trained the committed weights, step counts fixed (each under 10 minutes on one H200); the
# manifest's training.reproduce line says the same (a test checks it).
TRAIN_RUNS = (
    "--phase vae --vae-steps 3364",
    "--phase vae-clips --vae-clips-steps 548",
    "--phase transformer --dit-steps 2574 --dit-total-steps 5400",
    "--phase transformer --resume --dit-steps 2501 --dit-total-steps 5400",
    "--phase transformer --resume --dit-steps 325 --dit-total-steps 5400",
    "--phase transformer --resume --dit-steps 2419 --dit-total-steps 10800",
)
TRAIN_COMMAND = " && ".join(f"{_TRAIN} {run}" for run in TRAIN_RUNS)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


@dataclass
class TinyVideoConfig:
    """Configs of the components plus the clip geometries they are trained on.

    Attributes:
        vae, transformer, text_encoder, scheduler: constructor kwargs of the diffusers/transformers classes.
        geometries: (frames, height, width, weight) buckets the transformer is trained on; the first is the
            main one (the quality geometry), the others keep short low-resolution renders (CPU) on-model.
        vae_frames: frames of the VAE's training clips (windows of every bucket's full-length clips).
        vae_crop: (height, width) of the VAE's training crops, centred near the object (the VAE is fully
            convolutional: crops cost a fraction of a full frame and the object is always in them).
        max_sequence_length: text length the transformer is trained with; WanPipeline pads every prompt to
            ``max_sequence_length`` (default 512), so training uses the pipeline's default.
    """

    vae: dict = field(default_factory=dict)
    transformer: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    geometries: tuple = ((49, 192, 256, 0.75), (17, 96, 128, 0.25))
    vae_frames: int = 9
    vae_crop: tuple = (96, 128)
    max_sequence_length: int = 512

    def to_dict(self) -> dict:
        return {
            "vae": self.vae,
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "scheduler": self.scheduler,
            "geometries": [list(g) for g in self.geometries],
            "vae_frames": self.vae_frames,
            "vae_crop": list(self.vae_crop),
            "max_sequence_length": self.max_sequence_length,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TinyVideoConfig:
        return cls(
            vae=dict(d["vae"]),
            transformer=dict(d["transformer"]),
            text_encoder=dict(d["text_encoder"]),
            scheduler=dict(d["scheduler"]),
            geometries=tuple(tuple(g) for g in d["geometries"]),
            vae_frames=int(d["vae_frames"]),
            vae_crop=tuple(d["vae_crop"]),
            max_sequence_length=int(d["max_sequence_length"]),
        )


def _vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(vocabulary())


_SCHEDULER = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}

DEFAULT_CONFIG = TinyVideoConfig(
    vae={
        "base_dim": 16,
        "z_dim": 16,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [True, True],
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 4,  # WanPipeline sizes latents by these, not by the layers
        "dropout": 0.0,
        "latents_mean": [0.0] * 16,
        "latents_std": [1.0] * 16,
    },
    transformer={
        "patch_size": [1, 4, 4],
        "num_attention_heads": 6,
        "attention_head_dim": 64,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 128,
        "freq_dim": 256,
        "ffn_dim": 1152,
        "num_layers": 6,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    },
    text_encoder={
        "vocab_size": _vocab_size(),
        "d_model": 128,
        "d_kv": 32,
        "d_ff": 256,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 16,
        "relative_attention_max_distance": 64,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
    scheduler=dict(_SCHEDULER),
)

# CPU-sized everything, for the training smoke test and CI: same classes, same code paths.
SMOKE_CONFIG = TinyVideoConfig(
    vae={
        **DEFAULT_CONFIG.vae,
        "base_dim": 4,
        "z_dim": 4,
        "latents_mean": [0.0] * 4,
        "latents_std": [1.0] * 4,
    },
    transformer={
        **DEFAULT_CONFIG.transformer,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 32,
        "ffn_dim": 32,
        "num_layers": 2,
        "rope_max_seq_len": 64,
    },
    text_encoder={
        **DEFAULT_CONFIG.text_encoder,
        "d_model": 16,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 1,
        "num_heads": 2,
    },
    scheduler=dict(_SCHEDULER),
    geometries=((5, 32, 32, 0.75), (5, 16, 16, 0.25)),
    vae_frames=5,
    vae_crop=(16, 16),
    max_sequence_length=32,
)


class WeightsNotFoundError(FileNotFoundError):
    """The embedded model's weights are not where the loader looked."""


def render_defaults(device) -> dict:
    """Default clip geometry and steps for a device: a short low-resolution clip on CPU, the training
    geometry on a GPU."""
    if torch.device(device).type == "cpu":
        return {"frames": 17, "height": 96, "width": 128, "steps": 10}
    return {"frames": 49, "height": 192, "width": 256, "steps": 30}


def build_tokenizer():
    """The offline word-level tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the grammar's words.

    Lower-cases, turns punctuation into spaces, splits on whitespace and appends ``</s>`` (T5 style).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9\s]"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_components(config: TinyVideoConfig = DEFAULT_CONFIG, seed: int | None = 0) -> dict:
    """Freshly initialised components (seeded) keyed as WanPipeline's constructor names them."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    vae_kwargs = dict(config.vae)
    tr_kwargs = dict(config.transformer)
    tr_kwargs["patch_size"] = tuple(tr_kwargs["patch_size"])
    return {
        "vae": AutoencoderKLWan(**vae_kwargs),
        "transformer": WanTransformer3DModel(**tr_kwargs),
        "text_encoder": UMT5EncoderModel(UMT5Config(**config.text_encoder)),
        "tokenizer": build_tokenizer(),
        "scheduler": UniPCMultistepScheduler(**config.scheduler),
    }


def build_pipeline(components: dict):
    """A stock ``diffusers.WanPipeline`` from :func:`build_components`' dict (modules put in eval mode)."""
    from diffusers import WanPipeline

    for name in COMPONENTS:
        components[name].eval()
    return WanPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        scheduler=components["scheduler"],
        transformer=components["transformer"],
    )


MAX_SHARD_BYTES = 15 * 2**20


def _shards(state: dict, max_bytes: int) -> list[dict]:
    """Split a state dict (in order) into consecutive groups of at most ``max_bytes`` of tensor data."""
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    return [*shards, cur] if cur or not shards else shards


def save_weights(
    out_dir,
    components: dict,
    config: TinyVideoConfig,
    extra: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """Write each component as bf16 safetensors and the manifest (configs, vocabulary, file list, ``extra``).

    A component over ``max_shard_bytes`` (default 15 MiB) is split into ``<name>-00001-of-0000N.safetensors``
    shards (whole tensors each), else written as ``<name>.safetensors``; the manifest lists the files.

    Returns:
        {file name: bytes written}.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, files = {}, {}
    for name in COMPONENTS:
        state = {
            k: v.detach().to("cpu", torch.bfloat16).contiguous()
            for k, v in components[name].state_dict().items()
        }
        # UMT5 ties encoder.embed_tokens to shared: store one copy (load_state_dict re-ties it).
        state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
        shards = _shards(state, max_shard_bytes)
        files[name] = []
        for i, shard in enumerate(shards):
            fname = (
                f"{name}.safetensors"
                if len(shards) == 1
                else f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            path = out / fname
            save_file(shard, str(path), metadata={"format": "pt"})
            sizes[fname] = path.stat().st_size
            files[name].append(fname)
    manifest = {
        "format": 1,
        "config": config.to_dict(),
        "vocabulary": list(SPECIAL_TOKENS) + vocabulary(),
        "files": files,
        **(extra or {}),
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    sizes[path.name] = path.stat().st_size
    return sizes


def _resolve_weights_dir(weights_dir) -> Path:
    if weights_dir is not None:
        return Path(weights_dir)
    env = os.environ.get("DIT_ACCEL_TINY_VIDEO_WEIGHTS")
    return Path(env) if env else WEIGHTS_DIR


def load_tiny_video_pipeline(
    device="cpu", dtype: torch.dtype | None = None, weights_dir=None, fast_cpu_vae: bool = True
):
    """The embedded trained text-to-video model as a stock ``diffusers.WanPipeline``, offline.

    Args:
        device: where to put the pipeline ("cpu", "cuda", a torch.device).
        dtype: dtype of the transformer and VAE; default float32 on CPU, bfloat16 elsewhere. The text
            encoder stays float32 (it is tiny, and T5 layers are fragile in half precision).
        weights_dir: folder with the safetensors files and ``tiny_video.json``; default the package's
            ``weights/`` folder, or ``$DIT_ACCEL_TINY_VIDEO_WEIGHTS`` when set.
        fast_cpu_vae: decode with :mod:`dit_accel.pipelines.cpu_vae`'s fast CPU kernels when the VAE runs on
            the CPU in float32 (same frames to float32 rounding, about 5x faster at 49 x 192 x 256).

    Returns:
        a ``WanPipeline``; call it with ``prompt=...`` and a geometry whose frames are 4k + 1 and whose
        height and width are multiples of 16 (see :func:`render_defaults`).

    Raises:
        WeightsNotFoundError: the weights have not been trained into that folder yet (the message names the
            training command).
    """
    from safetensors.torch import load_file

    folder = _resolve_weights_dir(weights_dir)
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    files = {c: manifest.get("files", {}).get(c, [f"{c}.safetensors"]) for c in COMPONENTS}
    listed = [f for c in COMPONENTS for f in files[c]]
    missing = [f for f in (MANIFEST, *listed) if not (folder / f).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"the embedded tiny video model has no weights in {folder} (missing {', '.join(missing)}). "
            f"Train them on a GPU (six runs, about 40 minutes on an H200) with:\n    {TRAIN_COMMAND}\n"
            "or pass weights_dir= / set DIT_ACCEL_TINY_VIDEO_WEIGHTS to a folder written by that command."
        )
    config = TinyVideoConfig.from_dict(manifest["config"])
    expected = list(SPECIAL_TOKENS) + vocabulary()
    if manifest.get("vocabulary") != expected:
        raise ValueError(
            f"{folder / MANIFEST} was trained with a different vocabulary than this version's grammar; "
            f"retrain with: {TRAIN_COMMAND}"
        )
    components = build_components(config, seed=None)
    for name in COMPONENTS:
        state = {}
        for fname in files[name]:
            state.update(load_file(str(folder / fname)))
        module = components[name]
        if name == "text_encoder":
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for name in ("vae", "transformer"):
        _place(components[name], device, dtype)
    components["text_encoder"].to(device, torch.float32)
    if fast_cpu_vae:
        speed_up_vae(components["vae"])
    return build_pipeline(components)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to ``device``/``dtype`` keeping the modules diffusers keeps in float32 (``_keep_in_fp32_modules``:
    Wan's time embedder, norms, modulation table) in float32, as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        fp32 = t.is_floating_point() and bool(keep.intersection(name.split(".")))
        target = torch.float32 if fp32 else (dtype if t.is_floating_point() else t.dtype)
        t.data = t.data.to(device, target)
