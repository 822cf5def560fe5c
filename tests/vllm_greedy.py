"""Greedy tokens from vLLM's offline engine, for tests: `python vllm_greedy.py MODEL_DIR '[[ids...], ...]' N`.

A separate script because vLLM starts worker processes, which needs the __main__ guard and a fresh process.
"""

import json
import os
import sys

if __name__ == "__main__":
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))  # default binds one core
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        skip_tokenizer_init=True,  # prompts are token ids; the comparison is on ids too
        enforce_eager=True,
        gpu_memory_utilization=0.2,  # on the CPU backend: the share of RAM for the KV cache
        seed=0,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("GREEDY " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
