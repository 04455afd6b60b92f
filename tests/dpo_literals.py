"""The DPO losses of two public codebases, written out literally, for the beta-convention tests."""

import torch.nn.functional as F


def diffusers_dpo(e, f, beta):
    """examples/research_projects/diffusion_dpo/train_diffusion_dpo.py of diffusers, literally (w = even, l = odd)."""
    model_diff = e[0::2] - e[1::2]
    ref_diff = f[0::2] - f[1::2]
    logits = ref_diff - model_diff
    return -1 * F.logsigmoid(beta * logits).mean()


def original_diffusion_dpo(e, f, beta_dpo):
    """The original Diffusion-DPO train.py (SalesforceAIResearch/DiffusionDPO), literally: it writes 0.5 * beta."""
    model_diff = e[0::2] - e[1::2]
    ref_diff = f[0::2] - f[1::2]
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()
