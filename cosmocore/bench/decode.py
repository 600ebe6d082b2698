"""Decode-step latency: what one step of the rollout engine's model pass costs, and how that grows with
the number of rows decoding together. Each batch is prefilled (`causal.prefill`, the engine's KV cache)
and then fed one token per row per step (`causal.decode_step`, hidden states kept, as rollouts do),
under the attention kernels the decode loops use (`sampling.decoding`: all of PyTorch's but cuDNN's)
and under all of PyTorch's. Sampling and the sandbox are left out.

On a CPU the step grows with the rows (matrix work). On a GPU a step of a small model is bound by the
launch of its kernels, so it hardly grows with the rows: why `rollout.batch_size: auto` decodes 128 rows
on a GPU. Time your own GPU's rows here before setting a number instead.

    python -m cosmocore.bench.decode [--model DIR] [--rows 16,64] [--prompt 600] [--steps 30]

Decoder-only models. The last line is `RESULT decode_tokens_per_s <tokens/s at the most rows, under
the decode loops' kernels>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cosmocore.config import load_params
from cosmocore.policy.causal import decode_step, prefill
from cosmocore.policy.family import is_encoder_decoder
from cosmocore.policy.models import load_policy, materialise
from cosmocore.policy.sampling import decoding

WARMUP_STEPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model, rows: int, prompt: int, steps: int, kernels: str) -> tuple[float, int]:
    """Mean seconds per decoding step of `rows` rows after `prompt`-token prompts (the odd rows padded by
    a tenth, as mixed prompt lengths are), and the cache length reached. `kernels`: `decode` (the decode
    loops') or `all`."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt - (prompt // 10) * (i % 2),), generator=generator).tolist()
               for i in range(rows)]
    context = decoding() if kernels == "decode" else torch.no_grad()
    with context:
        cache, attention, positions, logits = prefill(model, prompts, pad_id=0, reserve=WARMUP_STEPS + steps + 1)
        positions = positions[:, -1] + 1
        for step in range(WARMUP_STEPS + steps):
            if step == WARMUP_STEPS:
                _sync(device)
                start = time.perf_counter()
            out, attention = decode_step(model, logits.argmax(-1), attention, positions, cache, hidden=True)
            logits, positions = out.logits[:, -1], positions + 1
        _sync(device)
    return (time.perf_counter() - start) / steps, cache.get_seq_length()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a materialised model folder (default: materialise model.source to a temp dir)")
    parser.add_argument("--rows", default="16,64", help="batch sizes to time, comma-separated (default 16,64)")
    parser.add_argument("--prompt", type=int, default=600, help="prompt tokens per row (default 600)")
    parser.add_argument("--steps", type=int, default=30, help="timed decoding steps per batch (default 30)")
    args = parser.parse_args()
    config = load_params()
    rows = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = load_policy(args.model or materialise(config.model, scratch), config.model)
        if is_encoder_decoder(model.config):
            raise SystemExit("error: the decode-step bench times decoder-only models; "
                             "for an encoder-decoder one use `python -m cosmocore.bench.rollout`")
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        params = sum(p.numel() for p in model.parameters())
        print(f"model {params / 1e6:.0f}M parameters, {model.config.num_hidden_layers} layers, on {device} in {dtype}; "
              f"{torch.get_num_threads()} torch threads; prompts of {args.prompt} tokens, {args.steps} timed steps")
        print(f"{'rows':>6}{'kernels':>9}{'ms/step':>10}{'tokens/s':>10}")
        result = None
        for n in rows:
            for kernels in ("decode", "all"):
                try:
                    seconds, _ = step_seconds(model, n, args.prompt, args.steps, kernels)
                except torch.OutOfMemoryError:
                    print(f"{n:>6}{kernels:>9}{'out of memory':>20}")
                    torch.cuda.empty_cache()
                    continue
                print(f"{n:>6}{kernels:>9}{seconds * 1000:>10.2f}{n / seconds:>10.0f}")
                if kernels == "decode" and n == max(rows):
                    result = n / seconds
    if result is None:
        raise SystemExit(f"error: {max(rows)} rows did not fit in memory: time fewer with --rows")
    print(f"RESULT decode_tokens_per_s {result:.0f}")


if __name__ == "__main__":
    main()
