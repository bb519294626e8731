"""dit_accel.pipelines.cpu_vae: the fast CPU forms of the VAE's 3D convolutions and Wan RMS norms match the
stock modules, and are taken exactly where they should be."""

import pytest
import torch
import torch.nn.functional as F
from _tiny_pipes import PIPELINES, wan
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from torch.profiler import ProfilerActivity, profile

from dit_accel.pipelines import cpu_vae, load_pipeline


def _vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True], attn_scales=[]
    ).eval()


def _latents(frames=3, height=5, width=7):  # odd sizes on purpose
    return torch.randn(1, 4, frames, height, width, generator=torch.Generator().manual_seed(1))


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def _ops(fn) -> dict[str, int]:
    """aten op name -> number of calls while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def test_patched_decode_matches_stock_and_patching_is_idempotent():
    vae = _vae()
    z = _latents()
    ref = _decode(vae, z)
    n = cpu_vae.speed_up_vae(vae)
    assert n == sum(cpu_vae._convertible_conv(m) or type(m) is WanRMS_norm for m in vae.modules()) > 0
    assert cpu_vae.speed_up_vae(vae) == 0
    out = _decode(vae, z)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (
        not torch.equal(out, ref) or n == 0
    )  # the fast kernels ran (bitwise equality would be a coincidence)


def test_patched_convolutions_leave_the_slow_kernel():
    vae = _vae()
    z = _latents()
    slow = "aten::slow_conv3d_forward"
    stock_calls = _ops(lambda: _decode(vae, z)).get(slow, 0)
    if stock_calls == 0:
        pytest.skip("this torch no longer picks slow_conv3d for batch-1 3D convolutions")
    kept = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d) and not cpu_vae._convertible_conv(m)]
    kept_calls = []
    for m in kept:
        m.register_forward_hook(lambda *_: kept_calls.append(1))
    cpu_vae.speed_up_vae(vae)
    fast = _ops(lambda: _decode(vae, z))
    # only the convolutions left on the stock path on purpose (1x1 spatial kernels) may still take it
    assert fast.get(slow, 0) <= len(kept_calls) < stock_calls
    assert fast["aten::mkldnn_convolution"] >= stock_calls - len(kept_calls)


def test_restore_gives_back_the_stock_modules():
    vae = _vae()
    z = _latents()
    ref = _decode(vae, z)
    n = cpu_vae.speed_up_vae(vae)
    assert cpu_vae.restore_vae(vae) == n
    assert cpu_vae.restore_vae(vae) == 0
    assert all("_conv_forward" not in m.__dict__ and "forward" not in m.__dict__ for m in vae.modules())
    assert torch.equal(_decode(vae, z), ref)


@pytest.mark.parametrize("channel_first", [True, False], ids=["channels-first", "channels-last"])
def test_rms_norm_fast_form_is_f_normalize(channel_first):
    torch.manual_seed(0)
    norm = WanRMS_norm(6, channel_first=channel_first, images=False)
    with torch.no_grad():
        norm.gamma.normal_()
    x = torch.randn(2, 6, 3, 5, 7) if channel_first else torch.randn(2, 3, 5, 7, 6)
    if channel_first:
        x[0, :, 1, 2, 3] = 0.0  # a zero vector: F.normalize's eps clamp
        x[1, :, 0, 0, 0] *= 1e-14
    ref = norm(x).detach()
    cpu_vae.speed_up_vae(norm)
    with torch.no_grad():
        out = norm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if channel_first:
        assert out[0, :, 1, 2, 3].eq(0).all()
        manual = F.normalize(x, dim=1) * norm.scale * norm.gamma
        torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_gradients_and_other_dtypes_take_the_stock_path():
    vae = _vae()
    z = _latents()
    stock = _vae()
    cpu_vae.speed_up_vae(vae)
    # a gradient wanted: stock kernels, the same gradient
    zs, zf = z.clone().requires_grad_(), z.clone().requires_grad_()
    stock.decode(zs).sample.square().mean().backward()
    vae.decode(zf).sample.square().mean().backward()
    torch.testing.assert_close(zf.grad, zs.grad, rtol=1e-4, atol=1e-7)
    assert _ops(lambda: vae.decode(z.clone().requires_grad_())) == _ops(
        lambda: stock.decode(z.clone().requires_grad_())
    )
    # bfloat16: bit for bit the stock module
    vae.to(torch.bfloat16)
    stock.to(torch.bfloat16)
    zb = z.to(torch.bfloat16)
    assert torch.equal(_decode(vae, zb), _decode(stock, zb))


def test_load_pipeline_patches_the_embedded_vae_unless_told_not_to():
    pipe = load_pipeline("embedded")
    assert any(getattr(m, cpu_vae._PATCHED, False) for m in pipe.vae.modules())
    assert not any(getattr(m, cpu_vae._PATCHED, False) for m in pipe.transformer.modules())
    plain = load_pipeline("embedded", fast_cpu_vae=False)
    assert not any(getattr(m, cpu_vae._PATCHED, False) for m in plain.vae.modules())


def test_speed_up_pipeline_patches_only_vae_components():
    pipe, _ = wan()
    n = cpu_vae.speed_up_pipeline(pipe)
    assert n == sum(getattr(m, cpu_vae._PATCHED, False) for m in pipe.vae.modules()) > 0
    assert not any(getattr(m, cpu_vae._PATCHED, False) for m in pipe.transformer.modules())
    assert cpu_vae.speed_up_pipeline(pipe) == 0
    assert cpu_vae.speed_up_pipeline(object()) == 0


def _render(pipe, call) -> torch.Tensor:
    out = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
    frames = getattr(out, "frames", None)
    return torch.as_tensor(frames if frames is not None else out.images)


@pytest.mark.parametrize(
    "name, patches",
    [
        ("hunyuan_video", True),
        ("cogvideox", True),
        ("ltx", True),
        ("mochi", True),
        ("qwenimage", True),
        ("flux", False),
    ],
)
def test_every_family_renders_the_same_with_its_vae_patched(name, patches):
    """load_pipeline patches whatever pipeline it loads: each family's tiny pipeline renders the same frames
    (to float32 rounding) with its VAE's 3D convolutions on oneDNN; a 2D VAE has nothing to patch."""
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    ref = _render(pipe, call)
    assert (cpu_vae.speed_up_pipeline(pipe) > 0) == patches
    torch.testing.assert_close(_render(pipe, call), ref, rtol=1e-4, atol=1e-4)
