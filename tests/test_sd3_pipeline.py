"""The sd3 world against diffusers' own StableDiffusion3Pipeline on the tiny variant (the independent reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.sd3 import SD3World
from bench.worlds.sd3_tiny import TINY, tiny_world_config
from samplers.ode import ODESampler
from samplers.schedule import flow_schedule

STEPS, SHIFT = 6, 3.0
PROMPTS = ["a photo of a cat", "a red car on a city street", "a painting of a horse in a forest"]


@pytest.fixture(scope="module")
def world_policy_pipe(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    world = SD3World(tiny_world_config(), tmp_path_factory.mktemp("cache"))
    policy = world.build_policy()
    # Non-zero LoRA B, so the adapters change the output and the comparison covers the LoRA path as well.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for n, p in policy.trainable_named_parameters().items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    comps = {k: v for k, v in world.comps.items() if k not in ("transformer", "scheduler")}
    pipe = StableDiffusion3Pipeline(transformer=policy.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                                    **comps)
    pipe.set_progress_bar_config(disable=True)
    return world, policy, pipe


def test_prompt_embeddings_match_pipeline(world_policy_pipe):
    world, _, pipe = world_policy_pipe
    ours = world.encode(PROMPTS)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=TINY["max_sequence_length"])
    assert ours["prompt_embeds"].shape == pe.shape == (3, TINY["clip_max_length"] + TINY["max_sequence_length"], 32)
    torch.testing.assert_close(ours["prompt_embeds"], pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)
    # Cached: the second call encodes nothing new and returns the same numbers.
    n = len(world.encoder)
    again = world.encode(PROMPTS[::-1])
    assert len(world.encoder) == n
    assert torch.equal(again["prompt_embeds"], ours["prompt_embeds"].flip(0))


def test_schedule_matches_scheduler_with_shift(world_policy_pipe):
    _, _, pipe = world_policy_pipe
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist())
    torch.testing.assert_close(pipe.scheduler.sigmas, flow_schedule(STEPS, SHIFT), rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.scheduler.timesteps, flow_schedule(STEPS, SHIFT)[:-1] * 1000, rtol=0, atol=1e-3)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_equals_pipeline(world_policy_pipe, guidance):
    world, policy, pipe = world_policy_pipe
    shape = world.latent_shape
    assert shape == (16, 16, 16)
    seed = 123
    latents = torch.randn((len(PROMPTS), *shape), generator=torch.Generator().manual_seed(seed))
    ref = pipe(prompt=PROMPTS, height=TINY["resolution"], width=TINY["resolution"], num_inference_steps=STEPS,
               sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist(), guidance_scale=guidance, latents=latents.clone(),
               output_type="latent", max_sequence_length=TINY["max_sequence_length"]).images

    meter = ComputeMeter()
    sampler = ODESampler({"steps": STEPS, "shift": SHIFT, "guidance": guidance})
    with meter.phase("rollout"), torch.no_grad():
        rollout = sampler.sample(PolicyCall(policy, meter, guidance=guidance), PROMPTS, world.encode(PROMPTS), 1, shape,
                                 torch.Generator().manual_seed(seed))
    assert torch.equal(rollout.x[rollout.step == 0], latents)  # the same initial noise
    diff = (rollout.x0 - ref).abs().max().item()
    print(f"guidance={guidance}: max |ours - StableDiffusion3Pipeline| = {diff:.3g}")
    assert diff < 1e-5
    assert ref.abs().mean() > 0.1  # a real sample, not a degenerate zero
    # CFG doubles the model evaluations: the meter counts per-sample forwards.
    assert meter.current.rollout_forwards == STEPS * len(PROMPTS) * (2 if guidance != 1.0 else 1)


def test_decode_matches_pipeline_postprocessing(world_policy_pipe):
    world, _, pipe = world_policy_pipe
    z = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(3))
    vae = pipe.vae
    ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    ref = pipe.image_processor.postprocess(ref, output_type="pt")
    ours = world.decode(z)
    assert ours.shape == (2, 3, TINY["resolution"], TINY["resolution"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
