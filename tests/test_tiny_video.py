"""The embedded tiny text-to-video model: procedural data, tokenizer, adherence check, training script
(smoke), loader and quality harness, all on CPU (the ``dit-accel`` command: tests/test_cli.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dit_accel.pipelines import load_tiny_video_pipeline
from dit_accel.pipelines.quality import compare, format_table, parse_method_spec, psnr, quality_table, ssim
from dit_accel.pipelines.tiny_video import adherence, data, model, train

SMALL = (9, 48, 64)
CPU_GEO = (17, 96, 128)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- data


def test_dataset_is_deterministic_by_seed():
    a = data.sample_batch(4, *SMALL, _gen(3), omit_prob=0.3)
    b = data.sample_batch(4, *SMALL, _gen(3), omit_prob=0.3)
    c = data.sample_batch(4, *SMALL, _gen(4), omit_prob=0.3)
    assert a.video.shape == (4, 3, *SMALL)
    assert torch.equal(a.video, b.video) and a.captions == b.captions
    assert not torch.equal(a.video, c.video)
    assert a.video.min() >= -1 and a.video.max() <= 1
    assert a.video.min() < -0.5 or a.video.max() > 0.5  # not a flat grey clip


def test_captions_parse_back_to_labels():
    b = data.sample_batch(64, 2, 32, 32, _gen(0), omit_prob=0.5)
    for i, text in enumerate(b.captions):
        parsed = data.parse_caption(text)
        assert parsed is not None, text
        for name, value in b.labels.items():
            if b.mentioned[name][i]:
                assert parsed[name] == int(value[i]), (text, name)
            else:
                assert name not in parsed
    assert data.parse_caption("a red dragon moving left") is None
    assert data.parse_caption("a red circle moving sideways") is None


def test_training_split_never_renders_held_out_combinations():
    labels = data.sample_labels(4000, _gen(0), "train")
    idx = data.combo_index(
        labels["colour"], labels["shape"], labels["size"], labels["motion"], labels["background"]
    )
    assert not data.HELD_OUT[idx].any()
    held = data.sample_labels(500, _gen(0), "held_out")
    idx = data.combo_index(held["colour"], held["shape"], held["size"], held["motion"], held["background"])
    assert data.HELD_OUT[idx].all()
    prompts = data.held_out_prompts(64)
    assert len({p for p, _ in prompts}) == 64
    for text, labels in prompts:
        assert data.HELD_OUT[data.combo_index(**labels)] and data.parse_caption(text) == labels
    trained = data.held_out_prompts(64, split="train")
    assert len({p for p, _ in trained}) == 64
    for text, labels in trained:
        assert not data.HELD_OUT[data.combo_index(**labels)] and data.parse_caption(text) == labels


@pytest.mark.gpu
def test_dataset_same_on_cuda():
    a = data.sample_batch(2, *SMALL, _gen(5))
    b = data.sample_batch(2, *SMALL, _gen(5), device="cuda")
    torch.testing.assert_close(b.video.cpu(), a.video, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- tokenizer / text encoding


def test_tokenizer_is_word_level_and_offline():
    tok = model.build_tokenizer()
    vocab = tok.get_vocab()
    assert vocab["<pad>"] == 0 and vocab["</s>"] == 1 and vocab["<unk>"] == 2
    assert set(data.vocabulary()) <= set(vocab) and len(vocab) == 3 + len(data.vocabulary())
    out = tok(["A Red, circle!", "a purple circle"], padding="max_length", max_length=6, return_tensors="pt")
    assert out.input_ids[0].tolist() == [vocab["a"], vocab["red"], vocab["circle"], 1, 0, 0]
    assert out.input_ids[1].tolist()[:4] == [vocab["a"], 2, vocab["circle"], 1]
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_training_prompt_encoding_matches_wan_pipeline():
    pipe = model.build_pipeline(model.build_components(model.SMOKE_CONFIG))
    prompts = ["a red circle moving left", "a small blue square orbiting clockwise on a gray background"]
    ref, neg = pipe.encode_prompt(prompts, max_sequence_length=32, device="cpu")
    with torch.no_grad():
        mine = train.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, 32, "cpu")
        empty = train.encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], 32, "cpu")
    torch.testing.assert_close(mine, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(empty[0], neg[0].detach(), atol=1e-5, rtol=0)
    assert ref[0, 6:].abs().max() == 0  # 5 words + </s>, then zeros


# ---------------------------------------------------------------- adherence


@pytest.fixture(scope="module")
def truth_clips():
    b = data.sample_batch(32, *CPU_GEO, _gen(11), split="all")
    return list(data.to_frames(b.video)), [data.caption(b.labels, i) for i in range(32)]


def _perfect(r, count):
    assert r["accuracy"] == {k: 1.0 for k in ("background", "colour", "motion", "shape", "size")}, r["rows"]
    assert r["measured"]["shape"] == count and r["core_all_correct"] == 1.0


def test_adherence_scores_ground_truth_clips_perfectly(truth_clips):
    _perfect(adherence.score_clips(*truth_clips), 32)


def test_adherence_scores_ground_truth_at_training_geometry():
    b = data.sample_batch(3, 49, 192, 256, _gen(12), split="all")
    _perfect(
        adherence.score_clips(list(data.to_frames(b.video)), [data.caption(b.labels, i) for i in range(3)]), 3
    )


def test_adherence_scores_shuffled_captions_low(truth_clips):
    frames, captions = truth_clips
    r = adherence.score_clips(frames, captions[1:] + captions[:1])
    assert r["mean_score"] < 0.5 and r["core_all_correct"] < 0.2, r["accuracy"]


def test_adherence_fails_a_clip_without_the_object():
    frames = np.full((17, 96, 128, 3), 0.5, dtype=np.float32)
    r = adherence.score_clip(frames, "a large red circle moving left on a gray background")
    assert r["correct"]["colour"] is False and r["correct"]["motion"] is False
    assert r["correct"]["background"] is True and r["score"] < 0.5


def test_adherence_reads_each_motion():
    for m in range(len(data.MOTIONS)):
        labels = {
            "colour": torch.tensor([2]),
            "shape": torch.tensor([0]),
            "size": torch.tensor([1]),
            "motion": torch.tensor([m]),
            "background": torch.tensor([0]),
        }
        video, _ = data.render(labels, *CPU_GEO, _gen(m))
        obs = adherence.analyze_clip(data.to_frames(video)[0])
        assert obs.motion == m, (data.MOTIONS[m], obs.details)


# ---------------------------------------------------------------- metrics


def test_psnr_and_ssim_basics():
    g = _gen(0)
    a = torch.rand(3, 24, 20, 3, generator=g)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    b = (a + 0.1).clamp(max=10)  # no clipping: exactly 0.1 everywhere
    torch.testing.assert_close(psnr(a, b), torch.full((3,), 20.0, dtype=torch.float64))
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    s = ssim(a, noisy)
    assert (s < 0.95).all() and (s > 0).all()
    torch.testing.assert_close(s, ssim(noisy, a))


def test_ssim_matches_a_direct_2d_window():
    g = _gen(1)
    a, b = torch.rand(2, 17, 19, 3, generator=g).double().unbind(0)
    coords = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-(coords**2) / (2 * 1.5**2))
    w2 = (w1[:, None] * w1[None, :]) / w1.sum() ** 2
    vals = []
    for c in range(3):
        x = a[..., c].unfold(0, 11, 1).unfold(1, 11, 1)  # [7, 9, 11, 11]
        y = b[..., c].unfold(0, 11, 1).unfold(1, 11, 1)
        mx, my = (x * w2).sum((-1, -2)), (y * w2).sum((-1, -2))
        vx = (x * x * w2).sum((-1, -2)) - mx**2
        vy = (y * y * w2).sum((-1, -2)) - my**2
        cxy = (x * y * w2).sum((-1, -2)) - mx * my
        m = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        vals.append(m.mean())
    torch.testing.assert_close(ssim(a[None], b[None])[0], torch.stack(vals).mean())


# ---------------------------------------------------------------- quality harness


@pytest.fixture(scope="module")
def random_pipe():
    pipe = model.build_pipeline(model.build_components(model.SMOKE_CONFIG, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 32}
WINDOW = {"method": "window", "density": 0.3, "block_q": 16, "block_k": 16}  # 48 tokens: 3 blocks, keeps 1


def test_quality_dense_vs_dense_is_identical(random_pipe):
    r = compare(random_pipe, "a red circle moving left", method="dense", call_kwargs=CALL)
    assert r["frames"].shape == (9, 64, 64, 3)
    assert r["psnr_mean"] == math.inf and all(math.isinf(p) for p in r["psnr"])
    assert r["ssim_mean"] == pytest.approx(1.0, abs=1e-12)
    assert r["adherence"] is not None and r["adherence_dense"] is not None


def test_quality_table_window_differs_and_pipeline_is_restored(random_pipe):
    stock = {k: type(v).__name__ for k, v in random_pipe.transformer.attn_processors.items()}
    methods = {"dense": {"method": "dense"}, "window": WINDOW}
    rows = quality_table(random_pipe, ["a red circle moving left"], methods, call_kwargs=CALL)
    assert [r["method"] for r in rows] == ["dense (reference)", "dense", "window"]
    assert rows[1]["psnr"] == math.inf and rows[1]["identical_frames"] == 9 and rows[1]["ssim"] == 1.0
    assert math.isfinite(rows[2]["psnr"]) and 0 < rows[2]["ssim"] < 1 and rows[2]["identical_frames"] == 0
    assert rows[2]["density"] == pytest.approx(1 / 3)
    assert rows[2]["plan_density"] == pytest.approx(1 / 3)  # every call of window is a plain sparse one
    assert rows[1]["plan_density"] is None and rows[0]["plan_density"] is None
    assert {k: type(v).__name__ for k, v in random_pipe.transformer.attn_processors.items()} == stock
    assert "| window |" in format_table(rows)
    assert parse_method_spec("window:density=0.25,dense_layers=(0, 1)") == (
        "window",
        {"density": 0.25, "dense_layers": (0, 1)},
    )


def test_quality_with_a_step_cache_skips_steps_and_leaves_no_hook(random_pipe):
    assert parse_method_spec("adaspa:sparsity=0.9+taylorseer") == (
        "adaspa",
        {"step_cache": "taylorseer", "sparsity": 0.9},
    )
    assert parse_method_spec("dense+taylorseer") == ("dense", {"step_cache": "taylorseer"})
    call = {**CALL, "num_inference_steps": 6}
    plain = compare(random_pipe, "a red circle moving left", call_kwargs=call, method="dense")
    cached = compare(
        random_pipe,
        "a red circle moving left",
        call_kwargs=call,
        dense=plain["dense_frames"],
        method="dense",
        step_cache="taylorseer",
    )
    assert plain["psnr_mean"] == math.inf  # dense through dit_accel is the stock op
    # TaylorSeer computes steps 0-2 and 5 of 6 (interval 5 from step 3): the others are predicted, so the
    # frames differ from dense
    assert math.isfinite(cached["psnr_mean"])
    assert cached["sparse_calls"] == 0
    assert getattr(random_pipe.transformer, "_cache_config", None) is None
    with pytest.raises(ValueError, match="step_cache must be one of"):
        compare(random_pipe, "a red circle", call_kwargs=CALL, method="dense", step_cache="fastercache")


# ---------------------------------------------------------------- training script and loader


def test_vae_loss_weights_mark_the_object_only():
    batch = data.sample_batch(4, 3, 32, 32, _gen(3))
    w = train.object_weights(batch.video)
    chroma = batch.video.amax(1, keepdim=True) - batch.video.amin(1, keepdim=True)
    assert w.shape == (4, 1, 3, 32, 32) and set(w.unique().tolist()) == {1.0, train.OBJECT_WEIGHT}
    assert torch.equal(w > 1, chroma > 0.1)
    assert (chroma[w == 1] < 0.1).all() and 0.002 < (w > 1).float().mean() < 0.2  # backgrounds are grey


def test_transformer_loss_weights_cover_the_object_on_the_latent_grid():
    torch.manual_seed(0)
    batch = data.sample_batch(3, 9, 32, 32, _gen(5))
    w = train.latent_object_weights(batch.video, (3, 16, 3, 8, 8), 3.0)
    assert w.shape == (3, 1, 3, 8, 8) and set(w.unique().tolist()) == {1.0, 3.0}
    for i in range(3):
        # latent frame 0 holds frame 0 alone; latent frame k frames 4k-3 .. 4k (Wan's causal VAE)
        for t, frames in ((0, [0]), (1, [1, 2, 3, 4]), (2, [5, 6, 7, 8])):
            for f in frames:
                x, y = batch.centers[i, f].tolist()
                assert w[i, 0, t, int(y) // 4, int(x) // 4] == 3.0
    assert 0.01 < (w > 1).float().mean() < 0.5
    # the same latent grid the VAE makes
    vae = model.build_components(model.SMOKE_CONFIG, seed=0)["vae"]
    with torch.no_grad():
        z = vae.encode(batch.video).latent_dist.mean
    assert train.latent_object_weights(batch.video, z.shape, 3.0).shape[2:] == z.shape[2:]
    with pytest.raises(ValueError, match="does not encode"):
        train.latent_object_weights(batch.video, (3, 16, 4, 8, 8), 3.0)


def test_vae_windows_keep_the_full_clip_motion():
    x = train.vae_clips(2, 17, 32, 32, 5, _gen(4), "cpu")
    g = _gen(4)
    full = data.sample_batch(2, 17, 32, 32, g).video
    start = int(torch.randint(0, 13, (1,), generator=g))
    assert x.shape == (2, 3, 5, 32, 32) and torch.equal(x, full[:, :, start : start + 5])


def test_vae_crops_hold_the_object_at_its_real_size():
    x = train.vae_clips(6, 17, 96, 128, 5, _gen(7), "cpu", crop=(48, 64))
    g = _gen(7)
    full = data.sample_batch(6, 17, 96, 128, g)
    start = int(torch.randint(0, 13, (1,), generator=g))
    window = full.video[:, :, start : start + 5]
    assert x.shape == (6, 3, 5, 48, 64)
    for i in range(6):  # each crop is a window of its clip, and the object is in its middle frame
        hits = [
            (y, xx)
            for y in range(0, 96 - 48 + 1)
            for xx in range(0, 128 - 64 + 1)
            if torch.equal(window[i, :, :, y : y + 48, xx : xx + 64], x[i])
        ]
        assert hits
        assert (train.object_weights(x[i : i + 1])[0, 0, 2] > 1).any()
    with pytest.raises(ValueError, match="larger"):
        train.vae_clips(1, 17, 32, 32, 5, _gen(7), "cpu", crop=(48, 64))


def test_vae_loss_sees_the_decoder_output_before_its_clamp():
    vae = model.build_components(model.SMOKE_CONFIG)["vae"].eval()
    z = 40 * torch.randn(1, 4, 2, 4, 4, generator=_gen(6))  # large latents: the output overshoots
    with torch.no_grad():
        raw = train.decode_unclamped(vae, z)
        out = vae.decode(z).sample
    assert raw.shape == out.shape and raw.abs().max() > 1
    assert torch.equal(raw.clamp(-1, 1), out)


def test_vae_posterior_starts_narrow():
    vae = model.build_components(model.SMOKE_CONFIG)["vae"]
    train.start_posterior_narrow(vae)
    with torch.no_grad():
        post = vae.encode(data.sample_batch(1, 5, 32, 32, _gen(5)).video).latent_dist
    assert torch.allclose(post.logvar, torch.full_like(post.logvar, train.INIT_LOGVAR))


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert train.main(["--smoke", "--out", str(out), "--vae-steps", "2", "--dit-steps", "2"]) == 0
    return out


def test_training_smoke_writes_weights_and_log(smoke_weights):
    files = {p.name for p in smoke_weights.iterdir()}
    assert {
        "vae.safetensors",
        "transformer.safetensors",
        "text_encoder.safetensors",
        "tiny_video.json",
        "train_log.json",
    } <= files
    log = json.loads((smoke_weights / "train_log.json").read_text())
    assert log["vae"]["steps"] == 2 and log["transformer"]["steps"] == 2
    assert all(math.isfinite(c["loss"]) for c in log["transformer"]["curve"])
    assert len(log["transformer"]["curve"]) == 2
    assert "--vae-steps 2 --vae-clips-steps 2 --dit-steps 2" in log["reproduce"]
    manifest = json.loads((smoke_weights / "tiny_video.json").read_text())
    assert manifest["config"]["vae"]["latents_std"] != [1.0] * 4  # measured, not the placeholder


def test_training_in_phases_reproduces_one_run(smoke_weights, tmp_path):
    """Same seed: --phase vae, vae-clips, transformer write exactly what one --phase all run writes."""
    from safetensors.torch import load_file

    flags = ["--smoke", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--phase vae-clips"):
        train.main([*flags, "--phase", "transformer", "--dit-steps", "2"])
    assert train.main([*flags, "--phase", "vae", "--vae-steps", "2"]) == 0
    assert not (tmp_path / model.MANIFEST).exists()  # a VAE alone is not a loadable model
    with pytest.raises(SystemExit, match="run --phase vae-clips"):
        train.main([*flags, "--phase", "transformer", "--dit-steps", "2"])
    assert train.main([*flags, "--phase", "vae-clips", "--vae-clips-steps", "2"]) == 0
    assert (tmp_path / "vae_clips_check.png").is_file()
    assert train.main([*flags, "--phase", "transformer", "--dit-steps", "2"]) == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [r["phase"] for r in log["runs"]] == ["vae", "vae-clips"]
    assert log["vae"]["steps"] == 2 and log["vae_clips"]["steps"] == 2 and log["transformer"]["steps"] == 2
    assert (
        log["reproduce"].count(" && ") == 2
        and "--phase vae-clips --vae-clips-steps 2 && " in log["reproduce"]
    )
    for name in ("vae", "transformer", "text_encoder"):
        a = load_file(str(smoke_weights / f"{name}.safetensors"))
        b = load_file(str(tmp_path / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_transformer_training_resumes_on_one_schedule(tmp_path, capsys):
    """--resume continues the saved transformer from the step it stopped at, on the same lr schedule."""
    flags = ["--smoke", "--out", str(tmp_path)]
    assert train.main([*flags, "--phase", "vae", "--vae-steps", "2"]) == 0
    with pytest.raises(SystemExit):
        train.main([*flags, "--phase", "vae-clips", "--resume"])
    assert "--resume continues a --phase transformer run" in capsys.readouterr().err
    assert train.main([*flags, "--phase", "vae-clips", "--vae-clips-steps", "2"]) == 0
    with pytest.raises(SystemExit, match="run --phase transformer"):
        train.main([*flags, "--phase", "transformer", "--resume", "--dit-steps", "2"])
    total = ["--dit-total-steps", "5"]
    assert train.main([*flags, "--phase", "transformer", "--dit-steps", "3", *total]) == 0
    first = json.loads((tmp_path / "train_log.json").read_text())
    saved = load_tiny_video_pipeline(weights_dir=tmp_path).transformer.state_dict()
    assert train.main([*flags, "--phase", "transformer", "--resume", *total]) == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    t = log["transformer"]
    assert (t["first_step"], t["last_step"], t["steps"], t["schedule_steps"]) == (3, 5, 2, 5)
    assert [c["step"] for c in t["curve"]] == [4, 5]
    schedule = train._Schedule(4e-4, warmup=4)  # the smoke run's lr and warm-up
    schedule.total = 5
    assert t["curve"][-1]["lr"] == pytest.approx(schedule(4) * 2 / 4)  # the schedule's tail, warming up again
    assert log["transformer_runs"][0]["curve"] == first["transformer"]["curve"]
    assert log["reproduce"].endswith("--phase transformer --resume --dit-steps 2 --dit-total-steps 5")
    assert "--phase transformer --dit-steps 3 --dit-total-steps 5 && " in log["reproduce"]
    manifest = json.loads((tmp_path / model.MANIFEST).read_text())
    assert manifest["training"]["steps"]["transformer"] == 5
    assert manifest["config"]["vae"]["latents_mean"] == first["transformer"]["latents_mean"]
    resumed = load_tiny_video_pipeline(weights_dir=tmp_path).transformer.state_dict()
    assert any(not torch.equal(saved[k], resumed[k]) for k in saved)  # it trained on
    with pytest.raises(SystemExit, match="already did 5 steps"):
        train.main([*flags, "--phase", "transformer", "--resume", *total])


def test_loader_builds_a_wan_pipeline_that_renders(smoke_weights):
    from diffusers import WanPipeline

    pipe = load_tiny_video_pipeline(device="cpu", weights_dir=smoke_weights)
    assert isinstance(pipe, WanPipeline)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red circle moving left",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=_gen(0),
    ).frames
    assert out.shape == (1, 5, 32, 32, 3) and np.isfinite(out).all()


def test_sharded_weights_load_like_single_files(smoke_weights, tmp_path):
    from safetensors.torch import load_file

    pipe = load_tiny_video_pipeline(device="cpu", weights_dir=smoke_weights)
    components = {"vae": pipe.vae, "transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    config = model.TinyVideoConfig.from_dict(
        json.loads((smoke_weights / model.MANIFEST).read_text())["config"]
    )
    sizes = model.save_weights(tmp_path, components, config, max_shard_bytes=4096)
    files = json.loads((tmp_path / model.MANIFEST).read_text())["files"]
    assert len(files["transformer"]) > 2 and files["transformer"][0].endswith(
        f"-of-{len(files['transformer']):05d}.safetensors"
    )
    assert set(sizes) == {model.MANIFEST, *(f for names in files.values() for f in names)}
    again = load_tiny_video_pipeline(device="cpu", weights_dir=tmp_path)
    for name, module in components.items():
        a, b = module.state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    merged = {}
    for f in files["transformer"]:
        shard = load_file(str(tmp_path / f))
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 4096
        merged.update(shard)
    assert merged.keys() == set(pipe.transformer.state_dict())
    (tmp_path / files["transformer"][1]).unlink()
    with pytest.raises(model.WeightsNotFoundError, match=files["transformer"][1]):
        load_tiny_video_pipeline(weights_dir=tmp_path)


def test_loader_without_weights_names_the_training_command(tmp_path):
    with pytest.raises(model.WeightsNotFoundError) as exc:
        load_tiny_video_pipeline(weights_dir=tmp_path)
    assert model.TRAIN_COMMAND in str(exc.value)


def test_committed_model_is_complete_and_reproducible():
    """The package's trained model: every file the manifest lists is there, its training record is the chain
    TRAIN_COMMAND names, its log lets ``--resume`` go on from it, and its VAE reconstructs a fresh CPU-sized
    clip (the training check measured 30.6 dB at 49 x 192 x 256)."""
    from dit_accel.pipelines.quality import psnr

    manifest = json.loads((model.WEIGHTS_DIR / model.MANIFEST).read_text())
    for files in manifest["files"].values():
        assert all((model.WEIGHTS_DIR / f).is_file() for f in files)
    assert manifest["training"]["reproduce"] == model.TRAIN_COMMAND and not manifest["training"]["smoke"]
    vae = model.build_components(model.DEFAULT_CONFIG)["vae"].eval()
    previous = train.load_previous_run(vae, model.DEFAULT_CONFIG, model.WEIGHTS_DIR, "transformer")
    assert previous["vae_clips"]["check"]["adherence"]["colour"] >= 0.9
    assert previous["transformer"]["last_step"] == manifest["training"]["steps"]["transformer"]
    clip = data.sample_batch(1, 17, 96, 128, _gen(21)).video
    with torch.no_grad():
        rec = vae.decode(vae.encode(clip).latent_dist.mean).sample
    assert psnr(data.to_frames(clip)[0], data.to_frames(rec)[0]).mean() > 22


def test_embedded_weights_render_on_cpu():
    pipe = load_tiny_video_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    d = model.render_defaults("cpu")
    out = pipe(
        prompt="a large red circle moving right on a black background",
        num_frames=d["frames"],
        height=d["height"],
        width=d["width"],
        num_inference_steps=d["steps"],
        output_type="np",
        generator=_gen(0),
    ).frames
    assert out.shape == (1, d["frames"], d["height"], d["width"], 3)
    assert adherence.score_clip(out[0], "a large red circle moving right on a black background")["correct"][
        "colour"
    ]


def test_attention_density_separates_plan_calls_from_full_passes():
    from dit_accel.pipelines.quality import attention_density

    records = [
        {"kind": "dense", "density": 1.0},
        {"kind": "refresh", "density": 1.0},
        {"kind": "corrected", "density": 0.1},
        {"kind": "corrected", "density": 0.2},
        {"kind": "fused_search", "density": 1.0},
    ]
    d = attention_density(records)
    assert d["plan_density"] == pytest.approx(0.15)
    assert d["density"] == pytest.approx((1.0 + 0.1 + 0.2 + 1.0) / 4)
    assert d["sparse_calls"] == 4 and d["calls"] == 5
    assert attention_density([{"kind": "dense", "density": 1.0}])["plan_density"] is None


def test_quality_cli_runs_a_tail_of_the_prompts(smoke_weights, tmp_path):
    """``--first-prompt`` runs held-out prompts from that index on (a long run's tail), and says so."""
    from dit_accel.pipelines import quality

    out = tmp_path / "q.md"
    argv = ["--device", "cpu", "--weights", str(smoke_weights), "--frames", "5", "--height", "32"]
    argv += ["--width", "32", "--steps", "2", "--prompts", "3", "--first-prompt", "2"]
    argv += ["--methods", "window:density=0.5"]
    assert quality.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["first_prompt"] == 2 and report["prompts_asked"] == 1
    assert [r["prompts"] for r in report["rows"]] == [1, 1]
    assert "1 held-out prompts from #2" in out.read_text()
    with pytest.raises(SystemExit):
        quality.main([*argv[:-4], "--first-prompt", "3", "--methods", "window:density=0.5"])


def test_quality_merge_equals_one_run_over_all_prompts(smoke_weights, tmp_path):
    """Two runs over adjoining prompt ranges merge into exactly the table one run over all of them gives;
    overlapping ranges and runs of another setup are refused."""
    from dit_accel.pipelines import quality

    argv = ["--device", "cpu", "--weights", str(smoke_weights), "--frames", "9", "--height", "64"]
    argv += ["--width", "64", "--steps", "2", "--methods", "window:density=0.1,dense_steps=0,block_q=16"]
    argv += ["radial:dense_steps=0"]  # a sparse window that differs from dense; radial computes every block
    paths = {}
    for name, span in (("all", ["--prompts", "3"]), ("head", ["--prompts", "2"])):
        paths[name] = tmp_path / f"{name}.md"
        assert quality.main([*argv, *span, "--out", str(paths[name])]) == 0
    paths["tail"] = tmp_path / "tail.md"
    assert quality.main([*argv, "--prompts", "3", "--first-prompt", "2", "--out", str(paths["tail"])]) == 0
    out = tmp_path / "merged.md"
    parts = [str(paths["tail"].with_suffix(".json")), str(paths["head"].with_suffix(".json"))]
    assert quality.main(["--merge", *parts, "--out", str(out)]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())
    whole = json.loads(paths["all"].with_suffix(".json").read_text())
    assert merged["parts"] == [{"first_prompt": 0, "prompts": 2}, {"first_prompt": 2, "prompts": 1}]
    assert [r["method"] for r in merged["rows"]] == [r["method"] for r in whole["rows"]]
    for got, want in zip(merged["rows"], whole["rows"]):
        for key in ("prompts", "frames", "identical_frames", "knobs"):
            assert got[key] == want[key], key
        for key in ("psnr", "psnr_min_frame", "ssim", "adherence", "density", "plan_density"):
            if want[key] is None:  # no plan-only calls (the dense row, radial's full plans)
                assert got[key] is None, (got["method"], key)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (got["method"], key)
        assert got["seconds"] is None and len(got["seconds_by_part"]) == 2
    assert any(math.isfinite(r["psnr"]) for r in merged["rows"][1:])  # the methods differ from dense
    assert "3 held-out prompts, cpu, merged from 2 runs" in out.read_text()

    with pytest.raises(SystemExit):  # prompts 0-1 twice
        quality.main(["--merge", str(paths["all"].with_suffix(".json")), parts[1], "--out", str(out)])
    head = json.loads(paths["head"].with_suffix(".json").read_text())
    tail = json.loads(paths["tail"].with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="overlap"):
        quality.merge_reports([whole, tail])
    with pytest.raises(ValueError, match="differ in 'device'"):
        quality.merge_reports([head, {**tail, "device": "NVIDIA H100 80GB HBM3"}])
    with pytest.raises(ValueError, match="leave a gap"):
        quality.merge_reports([{**head, "rows": [{**r, "prompts": 1} for r in head["rows"]]}, tail])
    with pytest.raises(SystemExit):
        quality.main(["--merge", parts[0], "--methods", "radial", "--out", str(out)])
