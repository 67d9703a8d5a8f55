"""The training loop's own options (train.*, budget.*, eval.*, checkpoint.*, lock.*), declared beside bench/training/train.py;
experiments/config.yaml, grids and presets override them."""
from __future__ import annotations

from bench.training.ema import EMA_RAMP_COUNTS
from bench.training.precision import MIXED_PRECISIONS
from bench.core.schema import Option
from objectives.kl import KL_TYPES

CELL_OPTIONS = {
    "train": {
        "prompts_per_iter": Option(8, int, low=1, help="distinct prompts per iteration"),
        "group_size": Option(8, int, low=2, help="samples per prompt; a group of 1 has no advantage"),
        "lr": Option(3e-4, float, low=0, low_open=True),
        "weight_decay": Option(0.0, float, low=0),
        "epochs": Option(1, int, low=1, help="passes over the batch per iteration"),
        "minibatches": Option(2, int, low=1, help="optimizer steps per epoch; > 1 makes r != 1"),
        "micro_batch": Option(None, int, low=1, nullable=True,
                              help="units per forward/backward, gradients accumulated over a minibatch (null: the "
                                   "whole minibatch); sets memory, not the number of optimizer steps"),
        "mixed_precision": Option("no", str, choices=MIXED_PRECISIONS,
                                  help="policy forward/backward under autocast (bf16, or fp16 with a GradScaler); "
                                       "fp32 master weights and log-probs; must match accelerate launch's"),
        "eval_ema": Option(None, dict, nullable=True,
                           fields={"decay": Option(0.9, float, low=0, high=1, high_open=True),
                                   "every": Option(1, int, low=1, help="optimizer steps between averages")},
                           help="evaluate an EMA of the weights, not the weights themselves; null: off"),
        "init_lora": Option(None, str, nullable=True,
                            help="start from an exported LoRA (.safetensors in diffusers' format); worlds with a "
                                 "peft LoRA policy (sd3, shapes)"),
        "max_grad_norm": Option(1.0, float, low=0, low_open=True),
        "kl_coef": Option(0.0, float, low=0, help="weight of the KL to the reference policy"),
        "kl_type": Option("velocity", str, choices=KL_TYPES,
                          help="velocity | transition (exact Gaussian KL) | transition_dt (Flow-GRPO's form)"),
        "sampling_policy": Option("current", str, choices=("current", "old"),
                                  help="which policy rolls out: the current one, or the EMA old policy (ELBO repo, "
                                       "DiffusionNFT; needs old_policy=ema)"),
        "drop_zero_advantage": Option(False, bool, help="train no unit whose advantage is exactly 0 (Flow-GRPO)"),
        "detach_uncond": Option(True, bool, help="CFG's unconditional branch without gradient in training "
                                                 "(DESIGN section 3); DDPO: false"),
        "old_policy": Option("sampling", str, choices=("sampling", "ema")),
        "ema_decay": Option(0.9, float, low=0, high=1, high_open=True),
        "ema_ramp": Option(None, dict, nullable=True, fields={"rate": Option(0.001, float, low=0, low_open=True),
                                                              "flat": Option(0, int, low=0),
                                                              "count": Option("iterations", str,
                                                                              choices=EMA_RAMP_COUNTS)},
                           help="DiffusionNFT's decay = min(ema_decay, rate * max(0, iteration - flat))"),
    },
    "budget": {
        "nfe": Option(None, int, low=1, nullable=True, help="model evaluations (forward 1, forward+backward 3)"),
        "device_hours": Option(None, float, low=0, low_open=True, nullable=True),
        "iterations": Option(20, int, low=1, nullable=True),
        "until": Option(None, dict, nullable=True, fields={
            "metric": Option("eval_accuracy", str, help="an eval metric of the world"),
            "value": Option(0.9, float, help="keep training until the metric first reaches this"),
            "cap_nfe": Option(1000000, int, low=1, help="but stop here in any case"),
        }, help="past the budget, train on until an eval reaches `value` (at most to cap_nfe): the first crossing of "
                "a slow method is seen, and the final figures are still read at the budget"),
    },
    "eval": {
        "every": Option(5, int, low=1, help="iterations between evals (unless every_nfe)"),
        "every_nfe": Option(None, int, low=1, nullable=True, help="eval each time cumulative NFE crosses a multiple"),
        "late_from_nfe": Option(None, int, low=0, nullable=True,
                                help="from this cumulative NFE on, evals `late_factor` times less often (the eval "
                                     "period, every_nfe or every, times late_factor); null: one period throughout"),
        "late_factor": Option(1, int, low=1, help="late_from_nfe's multiplier of the eval period"),
    },
    "checkpoint": {
        "every": Option(10, int, low=1, help="iterations between checkpoints (and at evals and the end)"),
        "keep": Option(2, int, low=1, help="checkpoints kept; an unreadable one falls back to the previous"),
        "export_lora": Option(True, bool, help="LoRA policies: write the adapter in diffusers' format at every eval "
                                               "point (lora/lora-<iteration>.safetensors)"),
    },
    "lock": {
        "heartbeat_s": Option(30.0, float, low=0, low_open=True),
        "stale_after_s": Option(600.0, float, low=0, low_open=True),
    },
}

