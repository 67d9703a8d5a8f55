"""The sd15 world against diffusers' own StableDiffusionPipeline with DDIMScheduler on the tiny variant."""
from __future__ import annotations

import pytest
import torch

from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.sd15 import SD15World
from bench.worlds.sd15_tiny import TINY15
from samplers import SAMPLERS

STEPS = 5
PROMPTS = ["a photo of a cat", "a red car on a city street"]


def tiny_config(**extra):
    cfg = {"name": "sd15", "variant": "tiny", "device": "cpu",
           "lora": {"r": 4, "alpha": 4, "targets": ["image_attention"], "seed": 0},
           "prompts": {"train": "simple_objects.txt", "eval_fraction": 0.1, "eval_max": 4},
           "eval": {"num_prompts": 2, "samples_per_prompt": 2, "steps": 3, "guidance": 2.0, "batch_size": 4}}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def world_policy_pipe(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    world = SD15World(tiny_config(), tmp_path_factory.mktemp("cache"))
    policy = world.build_policy()
    # Non-zero LoRA B (drawn from a local generator), so the comparison covers the adapters too.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (p for n, p in policy.trainable_named_parameters().items() if "lora_B" in n):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    c = world.comps
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=policy.transformer, scheduler=DDIMScheduler.from_config(c["scheduler"].config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return world, policy, pipe


def test_prompt_embeddings_and_lora_targets(world_policy_pipe):
    world, policy, pipe = world_policy_pipe
    ours = world.encode(PROMPTS)["prompt_embeds"]
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert ours.shape == (2, TINY15["clip_max_length"], TINY15["clip"]["hidden_size"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    lora = policy.trainable_named_parameters()
    # ddpo-pytorch's LoRA sits on every attention processor: to_q/k/v/out of attn1 and attn2 in each block.
    assert lora and all(("attn1" in n or "attn2" in n) and "lora_" in n for n in lora)
    assert {n.split(".attn")[1].split(".")[1] for n in lora} == {"to_q", "to_k", "to_v", "to_out"}


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_rollout_equals_pipeline(world_policy_pipe, guidance, eta):
    world, policy, pipe = world_policy_pipe
    shape = world.latent_shape
    assert shape == (4, 8, 8)
    gen = torch.Generator().manual_seed(123)
    latents = torch.randn((len(PROMPTS), *shape), generator=gen)
    # The pipeline draws each step's DDIM noise from `generator` after the initial latents, as our sampler does.
    ref = pipe(prompt=PROMPTS, height=TINY15["resolution"], width=TINY15["resolution"], num_inference_steps=STEPS,
               guidance_scale=guidance, eta=eta, latents=latents.clone(), generator=gen, output_type="latent").images
    meter = ComputeMeter()
    name = "ode" if eta == 0 else "ddim"
    sampler = SAMPLERS.get(name)({"name": name, "steps": STEPS, "guidance": guidance, **({"eta": eta} if eta else {})})
    with meter.phase("rollout"), torch.no_grad():
        r = sampler.sample(PolicyCall(policy, meter, guidance=guidance), PROMPTS, world.encode(PROMPTS), 1, shape,
                           torch.Generator().manual_seed(123))
    assert torch.equal(r.x[r.step == 0], latents)
    assert torch.equal(policy.family.model_time(r.schedule[:-1]), pipe.scheduler.timesteps.float())
    diff = (r.x0 - ref).abs().max().item()
    print(f"guidance={guidance} eta={eta}: max |ours - StableDiffusionPipeline| = {diff:.3g}")
    assert diff < 1e-5
    assert ref.abs().mean() > 0.1
    assert int((r.kind == 2).sum()) == (len(PROMPTS) * STEPS if eta else 0)
