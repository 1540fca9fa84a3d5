"""Greedy action tokens from a decoder folder served by vLLM, given prefix embeddings.

    python tests/integration/vllm_greedy.py DECODER_DIR INPUTS.pt OUT.json

INPUTS.pt holds {"prompts": [tensor (L_i, E) per observation], "bin_ids": [int], "action_dim": int}.
A separate process because vLLM spawns its own workers: the engine must be created under
`if __name__ == "__main__":`, and one engine serves every prompt of the test.
"""

from __future__ import annotations

import json
import sys


def main(decoder: str, inputs_path: str, out_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    inputs = torch.load(inputs_path)
    llm = LLM(model=decoder, enable_prompt_embeds=True, logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
              dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=inputs["action_dim"], allowed_token_ids=inputs["bin_ids"],
                            logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_embeds": e} for e in inputs["prompts"]], params, use_tqdm=False)
    with open(out_path, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":
    main(*sys.argv[1:])
