"""Teacher-forced scoring of action tokens, shared by the token families' `forward`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlarl.algo.losses import entropy_from_logits


def score_action_tokens(model, embeds, mask, positions, action_tokens, temperature: float):
    """Log-probs of given action tokens after the prefix, their entropies and the value at the last
    prefix position (VLA-RL's critic input), all float32.

    model          # a token policy: language_model, embed_tokens, bin_logits, first_bin_id, value_head
    embeds         # (B, L, E) prefix embeddings; mask (B, L); positions (B, L) (model.prefix)
    action_tokens  # (B, D) token ids of the sampled actions
    returns logprobs (B, D), entropy (B, D), values (B,)
    """
    d = action_tokens.shape[1]
    act = model.embed_tokens(action_tokens[:, :-1])  # the last action token predicts nothing
    act_pos = positions[:, -1:] + torch.arange(1, d, device=positions.device)
    out = model.language_model(
        inputs_embeds=torch.cat([embeds, act], 1),
        attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], d - 1)], 1),
        position_ids=torch.cat([positions, act_pos], 1),
        output_hidden_states=True,
        logits_to_keep=d,  # positions L-1 .. L+D-2 predict action tokens 0 .. D-1
    )
    logits = model.bin_logits(out.logits, temperature)  # (B, D, 256)
    logp_all = F.log_softmax(logits, -1)
    slots = (action_tokens - model.first_bin_id).long()
    logprobs = logp_all.gather(-1, slots[..., None])[..., 0]
    entropy = entropy_from_logits(logits)
    last_prefix = out.hidden_states[-1][:, embeds.shape[1] - 1]  # (B, E)
    values = model.value_head(last_prefix.to(model.value_head[0].weight.dtype))[:, 0].float()
    # Fresh tensors, not views: FSDP2 hooks the outputs for backward and warns on views.
    return logprobs.clone(), entropy, values.clone()
