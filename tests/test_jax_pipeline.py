"""The JAX SDXL pipeline against diffusers' StableDiffusionXLPipeline on the tiny pipeline: Euler timesteps and
sigmas, guided and unguided steps, whole images from `sample.py --backend jax` vs `--backend diffusers` with
the same seeds, the pipeline-folder reader's checks, and the VAE decoding of training previews."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import EulerDiscreteScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from PIL import Image

from koala_jax.cli import prepare as prepare_data
from koala_jax.cli import sample
from koala_jax.data import open_source
from koala_jax.errors import ConfigError, ConvertError, MissingPathError
from koala_jax.pipelines.euler import Conditioning, EulerSchedule, euler_sample
from koala_jax.pipelines.tiny import TINY_CROSS_ATTENTION_DIM, TINY_POOLED_DIM
from koala_jax.pipelines.vae import decode_latents
from koala_jax.weights import pipeline_dir
from koala_jax.weights.safetensors import load_file, save_file

from tests.conftest import MICRO, ROOT, WITHOUT_TORCH, build_teacher_pipeline, randomize_, rel_err

# A U-Net for the tiny pipeline's encoders that compiles in seconds (the pipeline's own is deeper).
MICRO_FOR_TINY = {
    **MICRO,
    "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
    "projection_class_embeddings_input_dim": TINY_POOLED_DIM + 6 * MICRO["addition_time_embed_dim"],
}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, as published (with the
# fields of other schedulers that EulerDiscreteScheduler ignores).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SDXL pipeline folder, micro U-Net folder that fits its encoders)."""
    root = tmp_path_factory.mktemp("jax_pipeline")
    build_teacher_pipeline(root / "pipeline")
    randomize_(TorchUNet(**MICRO_FOR_TINY), seed=7).save_pretrained(root / "micro")
    return root / "pipeline", root / "micro"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_euler_timesteps_and_sigmas_match_diffusers(spacing, beta_schedule):
    config = {**SDXL_SCHEDULER, "beta_schedule": beta_schedule}
    ours = EulerSchedule.from_diffusers(config, timestep_spacing=spacing)
    reference = EulerDiscreteScheduler.from_config(config, timestep_spacing=spacing)
    for steps in (1, 4, 10, 25):
        reference.set_timesteps(steps)
        timesteps = ours.timesteps(steps)
        np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
        # diffusers computes the schedule in float32 (1 - abar near t = 0 keeps ~4 digits), ours in float64.
        np.testing.assert_allclose(ours.sigmas(timesteps), reference.sigmas.numpy(), rtol=1e-5, atol=1e-6)
        sigma = ours.init_noise_sigma(ours.sigmas(timesteps))
        np.testing.assert_allclose(sigma, float(reference.init_noise_sigma), rtol=1e-5, atol=1e-6)


class ToyDenoiser(nn.Module):
    """A U-Net stand-in whose output depends on the input, the timestep and every conditioning input."""

    @nn.compact
    def __call__(self, x, t, prompt_embeds, pooled, time_ids):
        per_sample = prompt_embeds.mean(axis=(1, 2)) + pooled.mean(axis=1) + 1e-4 * time_ids.sum(axis=1)
        return 0.6 * x + 1e-3 * t + per_sample[:, None, None, None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_steps_match_diffusers(prediction_type, guidance):
    """The whole loop (init noise scaling, input scaling, guidance, x0 and step) against diffusers' scheduler."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    cond, uncond = (
        Conditioning(
            rng.standard_normal((2, 7, 6)).astype(np.float32),
            rng.standard_normal((2, 3)).astype(np.float32),
            np.tile(np.float32([[64, 48, 0, 0, 64, 48]]), (2, 1)),
        )
        for _ in range(2)
    )
    config = {**SDXL_SCHEDULER, "prediction_type": prediction_type}
    guided = guidance > 1
    got = euler_sample(
        ToyDenoiser(), {}, noise, cond, EulerSchedule.from_diffusers(config), 5, guidance, uncond if guided else None
    )

    scheduler = EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(5)
    toy = lambda x, t, c: ToyDenoiser().apply({}, x, t, *c)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t).numpy()
        out = np.asarray(toy(scaled, float(t), cond))
        if guided:
            out_uncond = np.asarray(toy(scaled, float(t), uncond))
            out = out_uncond + guidance * (out - out_uncond)
        x = scheduler.step(torch.from_numpy(out), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(got), x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        ["--preset", "koala", "--steps", "3", "--negative-prompt", "blurry, dark"],
        ["--preset", "lightning", "--steps", "3"],
    ],
    ids=["leading_guidance_7.5_negative", "trailing_guidance_3.5_no_negative"],
)
def test_sample_backends_give_the_same_images(folders, tmp_path, flags, capsys):
    """Same seeds, same pipeline: `--backend jax` reproduces `--backend diffusers` image for image. SDXL-Base's
    leading spacing (steps_offset 1) with a negative prompt, and KOALA-Lightning's trailing spacing with
    guidance 3.5 and no negative prompt (zero embeddings: force_zeros_for_empty_prompt)."""
    pipeline, micro = folders
    common = ["--model", pipeline, "--unet", micro, "--prompt", "a koala", "--prompt", "a cat on a red sofa"]
    common += ["--height", "64", "--width", "48", "--seed", "11", *flags]
    for backend in ("diffusers", "jax"):
        out = tmp_path / backend
        assert sample.main([str(a) for a in common] + ["--backend", backend, "--out", str(out)]) == 0
    captured = capsys.readouterr().out
    assert "(jax)" in captured and "(diffusers)" in captured
    for index in range(2):
        images = [Image.open(tmp_path / backend / f"{index:04d}.png") for backend in ("diffusers", "jax")]
        settings = [json.loads(image.text["parameters"]) for image in images]
        assert [s["backend"] for s in settings] == ["diffusers", "jax"]
        assert settings[0] | {"backend": "jax"} == settings[1]
        pixels = [np.asarray(image) for image in images]
        print(f"{flags}: image {index} PSNR {psnr(*pixels):.1f} dB")
        assert pixels[0].std() > 5 and psnr(*pixels) >= MIN_PSNR_DB


def test_sample_jax_refuses_what_it_cannot_do(folders, tmp_path, capsys):
    pipeline, _ = folders
    (tmp_path / "unet").mkdir()
    randomize_(TorchUNet(**MICRO)).save_pretrained(tmp_path / "unet")  # cross_attention_dim 16, not the encoders' 64
    cases = [
        (["--scheduler", "dpm++"], "--backend jax samples with euler or euler-trailing"),
        (["--unet", str(tmp_path / "unet")], "does not fit this pipeline's encoders (cross_attention_dim"),
        (["--height", "63"], "is not a multiple of the VAE's factor 2"),
    ]
    for flags, message in cases:
        argv = ["--backend", "jax", "--model", str(pipeline), "--prompt", "x", "--steps", "1", "--out", str(tmp_path)]
        assert sample.main(argv + flags) == 1
        assert message in capsys.readouterr().err


def test_pipeline_folder_checks_name_the_problem(folders, tmp_path):
    pipeline, _ = folders
    parts = pipeline_dir.read_pipeline(pipeline)
    assert parts.force_zeros_for_empty_prompt and parts.scheduler_config["steps_offset"] == 1
    assert parts.text.config.hidden_size + parts.text.config_2.hidden_size == TINY_CROSS_ATTENTION_DIM

    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = dict(load_file(weights))
    state["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    save_file(state, weights)
    with pytest.raises(ConvertError, match=r"shape mismatch for 'decoder.conv_out.weight'.*\(3, 8, 1, 1\)"):
        pipeline_dir.read_pipeline(broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(MissingPathError, match="text_encoder_2/"):
        pipeline_dir.read_pipeline(broken)
    with pytest.raises(ConfigError, match="'use_karras_sigmas'"):
        EulerSchedule.from_diffusers({**parts.scheduler_config, "use_karras_sigmas": True})


def test_old_checkpoint_layouts_read_the_same(folders, tmp_path):
    """transformers 4's `text_model.` prefix and saved position_ids, and old VAE attention names
    (query/key/value/proj_attn), read as diffusers and transformers read them."""
    pipeline, _ = folders
    for name in ("text_encoder", "vae"):
        shutil.copytree(pipeline / name, tmp_path / name)
    text_file = tmp_path / "text_encoder" / "model.safetensors"
    text_state = {f"text_model.{k}": v for k, v in load_file(text_file).items()}
    save_file({**text_state, "text_model.embeddings.position_ids": np.arange(77)[None]}, text_file)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae_state = {}
    for key, value in load_file(vae_file).items():
        for new, old in renames.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        vae_state[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in vae_state
    save_file(vae_state, vae_file)

    def same(a, b):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    same(
        pipeline_dir.read_text_encoder(tmp_path / "text_encoder", False),
        pipeline_dir.read_text_encoder(pipeline / "text_encoder", False),
    )
    same(pipeline_dir.read_vae(tmp_path / "vae")[1], pipeline_dir.read_vae(pipeline)[1])


def test_preview_decoding_matches_diffusers(folders):
    """Training previews (cfg.sample.vae) decode in JAX what diffusers' VAE decodes."""
    pipeline, _ = folders
    latents = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    vae = TorchVAE.from_pretrained(pipeline / "vae").eval()
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    want = ((want.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    got = decode_latents(latents, pipeline / "vae")
    assert got.shape == (2, 12, 10, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_commands_run_without_torch_on_two_devices(folders, tmp_path):
    """prepare_data.py and sample.py with --backend jax where torch and diffusers cannot be imported, on two
    devices with batches that do not divide evenly: the same records and images as the PyTorch backends."""
    pipeline, micro = folders
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"random picture number {i}")
    prompts = ["a koala", "a red cat", "two trees"]
    sample_argv = ["--model", pipeline, "--unet", micro, "--steps", "2", "--height", "32", "--width", "32"]
    sample_argv += [arg for prompt in prompts for arg in ("--prompt", prompt)]
    commands = {
        "prepare": ["--input", images, "--teacher", pipeline, "--resolution", "32", "--batch-size", "3"],
        "sample": sample_argv,
    }
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    for command, argv in commands.items():
        out = ["--out", tmp_path / "jax"] if command == "sample" else ["--output-dir", tmp_path / "jax_data"]
        argv = [str(a) for a in [*argv, *out, "--backend", "jax"]]
        code = f"{WITHOUT_TORCH}from koala_jax.cli import {command}; sys.exit({command}.main({argv!r}))"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "on cpu (jax)" in done.stdout

    assert prepare_data.main([str(a) for a in [*commands["prepare"], "--output-dir", tmp_path / "torch_data"]]) == 0
    source = {name: open_source(str(tmp_path / name)) for name in ("jax_data", "torch_data")}
    records = {name: {src[i]["caption"]: src[i] for i in range(len(src))} for name, src in source.items()}
    assert sorted(records["jax_data"]) == sorted(records["torch_data"]) and len(records["jax_data"]) == 4
    for caption, want in records["torch_data"].items():
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            assert rel_err(records["jax_data"][caption][key], want[key]) <= 2e-3, (caption, key)

    assert sample.main([str(a) for a in [*sample_argv, "--out", tmp_path / "diffusers"]]) == 0
    for index in range(len(prompts)):
        pixels = [np.asarray(Image.open(tmp_path / name / f"{index:04d}.png")) for name in ("diffusers", "jax")]
        assert psnr(*pixels) >= MIN_PSNR_DB, index
