"""Rollout throughput: plain `model.generate`, one prompt at a time, against the rollout engine, side by
side in one run, on the same HumanEval prompts (chat or completion, as `model.prompt_style` resolves),
model, max tokens and sampling settings.

(a) plain: for every task and sample, `model.generate` on that one prompt (sampling with the rollout
    temperature and top-p and no top-k, as the engine does, up to `max_new_tokens`, stopping at
    end-of-sequence), then code extraction.
(b) engine: `cosmocore.rl.rollout.rollout` on the same tasks, with everything training needs (behaviour
    log-probs, entropy, pooled hidden state) and sandbox execution overlapped with generation.

Completed programs per second is measured from prompts to extracted programs (stopping a sample as soon
as its program is complete counts as a gain); the engine's rollouts per second also include execution.
The roof is the measured fp32 matrix-multiply FLOP/s over 2 × parameters (one multiply-add per parameter
per generated token); for an encoder-decoder model, whose encoder runs once per prompt, it is lower than
what the decoder alone allows. On a GPU no roof is given (a CPU's matrix multiply says nothing of it).
Either architecture runs through the same engine entry point (`policy.stream` picks its decode loop)
and the same baseline.

    python -m cosmocore.bench.rollout [--model DIR] [--tasks 8] [--samples 4]     (or: cosmocore bench rollout)

The last line is `RESULT rollout_speedup <engine programs/s ÷ plain programs/s>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from cosmocore.config import load_params
from cosmocore.data.datasets import load_humaneval
from cosmocore.policy.interface import encode, generate_inputs
from cosmocore.policy.models import load_policy, materialise
from cosmocore.policy.prompts import build_prompt, extract_code, program_for, resolve_style
from cosmocore.rl.rollout import RunIds, engine_rows, rollout
from cosmocore.sandbox.runner import Sandbox


def matmul_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained fp32 matrix-multiply FLOP/s with torch's current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def pick_tasks(n: int):
    """`n` HumanEval tasks spread evenly over the benchmark (a mix of prompt lengths)."""
    tasks = load_humaneval()
    step = max(1, len(tasks) // n)
    return tasks[::step][:n]


def run_plain(model, tokenizer, tasks, cfg, style, samples: int, seed: int) -> dict:
    torch.manual_seed(seed)
    tokens, programs = 0, []
    start = time.perf_counter()
    for task in tasks:
        prompt = encode(model, tokenizer, build_prompt(task, tokenizer, style))[-cfg.max_prompt_tokens :]
        inputs = generate_inputs(model, prompt)
        given = inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1]  # what the output repeats
        for _ in range(samples):
            with torch.no_grad():
                out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                     max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=0, pad_token_id=tokenizer.pad_token_id)
            completion = out[0, given:].tolist()
            tokens += len(completion)
            text = tokenizer.decode(completion, skip_special_tokens=True)
            programs.append(program_for(task, extract_code(text, style), style))
    wall = time.perf_counter() - start
    return {"programs": len(programs), "with_code": sum(bool(p) for p in programs), "tokens": tokens, "wall_s": wall}


def run_engine(model, tokenizer, tasks, cfg, reward_cfg, sandbox, style, samples: int, seed: int) -> dict:
    ids = RunIds(run="bench", variant="bench", seed=seed, iteration=0)
    trajectories, stats = rollout(model, tokenizer, tasks, sandbox, cfg, reward_cfg, style, ids, samples_per_task=samples,
                                  seed=seed, desc="engine")
    return {"programs": len(trajectories), "with_code": sum(bool(t.code) for t in trajectories), "tokens": stats["tokens"],
            "wall_s": stats["programs_s"], "generate_s": stats["generate_s"], "rollout_s": stats["wall_s"],
            "passed": stats["passed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a materialised model folder (default: materialise model.source to a temp dir)")
    parser.add_argument("--tasks", type=int, default=8, help="HumanEval tasks (default 8)")
    parser.add_argument("--samples", type=int, default=0, help="samples per task (default: rollout.samples_per_task)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="default: rollout.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=0, help="engine batch in samples (default: rollout.batch_size)")
    parser.add_argument("--engine-only", action="store_true", help="skip the plain baseline (for quick iterations)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (default: model.threads, 0 = all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_params()
    if args.threads:
        config = config.model_copy(update={"model": config.model.model_copy(update={"threads": args.threads})})
    cfg = config.rollout
    updates = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size)) if v}
    cfg = cfg.model_copy(update=updates)
    samples = args.samples or cfg.samples_per_task
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or materialise(config.model, scratch)
        model, tokenizer = load_policy(folder, config.model)
        params = sum(p.numel() for p in model.parameters())
        style = resolve_style(config.model.prompt_style, tokenizer)
        tasks = pick_tasks(args.tasks)
        lengths = [len(encode(model, tokenizer, build_prompt(t, tokenizer, style))) for t in tasks]
        device = next(model.parameters()).device
        on_cpu = device.type == "cpu"
        flops = matmul_flops() if on_cpu else None
        roof = flops / (2 * params) if on_cpu else None
        print(f"{len(tasks)} HumanEval tasks × {samples} samples, {style} prompts of {min(lengths)}–{max(lengths)} tokens, "
              f"max_new_tokens {cfg.max_new_tokens}, temperature {cfg.temperature}, top_p {cfg.top_p}, "
              f"engine batch {engine_rows(cfg, model)} (rollout.batch_size {cfg.batch_size})")
        print(f"model {params / 1e6:.0f}M parameters on {device}; {torch.get_num_threads()} torch threads, "
              f"load {os.getloadavg()[0]:.2f}" + (f"; matmul {flops / 1e9:.1f} GFLOP/s → roof {roof:.0f} tokens/s" if on_cpu else ""))
        with Sandbox(config.sandbox) as sandbox:
            engine = run_engine(model, tokenizer, tasks, cfg, config.reward, sandbox, style, samples, args.seed)
        plain = None if args.engine_only else run_plain(model, tokenizer, tasks, cfg, style, samples, args.seed)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(f"{'':10}{'programs/s':>12}{'tokens/s':>10}{'roof':>7}{'tokens':>8}{'with code':>11}{'wall s':>8}")
    for name, row in (("plain", plain), ("engine", engine)):
        if row is None:
            continue
        rate = row["tokens"] / row.get("generate_s", row["wall_s"])
        print(f"{name:10}{row['programs'] / row['wall_s']:>12.3f}{rate:>10.1f}{f'{rate / roof:.0%}' if roof else '-':>7}{row['tokens']:>8}"
              f"{row['with_code']:>11}{row['wall_s']:>8.1f}")
    print(f"engine rollouts/s including sandbox execution: {engine['programs'] / engine['rollout_s']:.3f} "
          f"({engine['passed']}/{engine['programs']} passed)")
    if plain is not None:
        speedup = (engine["programs"] / engine["wall_s"]) / (plain["programs"] / plain["wall_s"])
        print(f"RESULT rollout_speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
