"""A tiny random StableDiffusion3Pipeline built in code, offline, for tests and CPU benchmark smoke runs.

Two tiny CLIP text encoders with projection, a one-layer T5 encoder (d_model 32, the transformer's
joint_attention_dim, as T5-XXL's 4096 is SD3's), a tiny SD3 transformer, a tiny VAE (scale 2, 16 latent channels
as SD3's), the flow-matching scheduler with SD3.5's shift 3. CLIP's tokenizer is written as files (a byte-level
vocabulary, no merges) because transformers 5 builds a 2-token vocabulary from constructor arguments; T5's is a
`tokenizers` Unigram model over single characters, which reloads as T5's fast tokenizer (a WordLevel one does
not).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 32


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-level BPE's printable stand-in for each of the 256 bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return list(out.values())


def _write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def _t5_tokenizer():
    """T5's fast tokenizer over a Unigram vocabulary of single characters (each also with the word-start mark)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0),
             *[(c, -2.0) for c in chars], *[("\u2581" + c, -1.5) for c in chars]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def build_tiny_sd3(folder: Path, seed: int = 0, transformer=None, t5: bool = True) -> Path:
    """Save a tiny SD3 pipeline (float32, random weights) to folder and return it; `transformer` replaces
    the tiny one (it must take 16 latent channels and joint_attention_dim 32); t5=False leaves T5 out."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = folder / "_tokenizer_src"
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    clip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=len(tokenizer), projection_dim=16, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    transformer = transformer or SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=IMAGE_SIZE // 2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=IMAGE_SIZE, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = _t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=transformer.config.joint_attention_dim, d_kv=8, d_ff=32, num_layers=1,
            num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(str(folder))
    return folder
