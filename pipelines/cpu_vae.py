"""Faster VAE decoding on the CPU: two stock modules routed to the CPU kernels they should have used.

Decoding a video is most of a CPU render of the embedded model: 14.6 s of a 28 s, 10-step render at
49 x 192 x 256 on 2 cores, nearly all of it in two places that are slow for reasons outside diffusers:

- 3D convolutions. PyTorch picks its oneDNN convolution for batch-1 float32 inputs only when
  ``N * C * D * H`` passes 20,480 (a rule written for 2D images). The Wan VAE decodes a few frames at a
  time, so its 3x3x3 convolutions fall to ``slow_conv3d`` (im2col plus a matmul), 2-12x slower than oneDNN
  on the same call.
- ``WanRMS_norm``. ``F.normalize`` over the channel dimension of a channels-first 5D tensor is a strided
  reduction that costs ~25x a sum of squares and a reciprocal square root on the CPU.

:func:`speed_up_vae` patches the instances in a module tree (usually ``pipe.vae``): a patched convolution
calls ``aten.mkldnn_convolution`` and a patched norm computes ``x * rsqrt(max(sum(x^2), eps^2))``, which is
``F.normalize``'s ``x / max(||x||, eps)``. Each takes its fast form only for float32 CPU tensors, with no
gradient wanted and outside ``torch.compile``; anything else runs the stock code, so a patched VAE moved to
a GPU runs exactly as before. Results agree with stock to float32 rounding (about 1e-6 relative), not bit
for bit. Nothing here touches attention or the transformer: stock and accelerated renders of one pipeline
share the decoder, so dit_accel's speedups are ratios at equal decoding cost.
"""

from __future__ import annotations

import types

import torch

_PATCHED = "_dit_accel_cpu_fast"


def _fast_path(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))


def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _fast_path(x, weight, bias) and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, self.padding, self.stride, self.dilation, self.groups
        )
    return type(self)._conv_forward(self, x, weight, bias)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (self.channel_first and _fast_path(x, self.gamma)):
        return type(self).forward(self, x)
    eps = 1e-12  # F.normalize's default
    normalized = x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(eps * eps))
    return normalized * self.scale * self.gamma + self.bias


def _convertible_conv(module: torch.nn.Module) -> bool:
    """A zero-padded 3D convolution with a spatial kernel; 1x1 spatial kernels are as fast when stock."""
    return (
        isinstance(module, torch.nn.Conv3d)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and tuple(module.kernel_size[1:]) != (1, 1)
    )


def _wan_rms_norm_class():
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
    except ImportError:  # a diffusers without the Wan VAE
        return None
    return WanRMS_norm


def speed_up_vae(module: torch.nn.Module) -> int:
    """Route ``module``'s 3D convolutions and Wan RMS norms to fast CPU kernels (module docstring).

    Args:
        module: a VAE (or any module tree); patched in place, instance by instance. Patching twice is a
            no-op.

    Returns:
        the number of submodules patched by this call.
    """
    rms_norm = _wan_rms_norm_class()
    patched = 0
    for sub in module.modules():
        if getattr(sub, _PATCHED, False):
            continue
        if _convertible_conv(sub):
            sub._conv_forward = types.MethodType(_conv_forward, sub)
        elif rms_norm is not None and type(sub) is rms_norm:
            sub.forward = types.MethodType(_rms_norm_forward, sub)
        else:
            continue
        setattr(sub, _PATCHED, True)
        patched += 1
    return patched


def restore_vae(module: torch.nn.Module) -> int:
    """Undo :func:`speed_up_vae` on ``module``; returns the number of submodules restored."""
    restored = 0
    for sub in module.modules():
        if getattr(sub, _PATCHED, False):
            sub.__dict__.pop("_conv_forward", None)
            sub.__dict__.pop("forward", None)
            del sub.__dict__[_PATCHED]
            restored += 1
    return restored


def speed_up_pipeline(pipe) -> int:
    """:func:`speed_up_vae` on every VAE-like component of a diffusers pipeline (``pipe.components``); 0 when
    it has none."""
    components = getattr(pipe, "components", None) or {}
    return sum(
        speed_up_vae(c) for name, c in components.items() if isinstance(c, torch.nn.Module) and "vae" in name
    )


__all__ = ["restore_vae", "speed_up_pipeline", "speed_up_vae"]
