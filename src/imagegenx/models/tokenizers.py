"""Tokenizers that ship with the package, so no model load ever needs the network.

The CLIP BPE files are the real ones (built from open_clip's vocabulary by
``scripts/build_clip_tokenizer.py``). Random-weight SD 3.5 and Flux models also need a T5 tokenizer,
whose SentencePiece model no registry we can reach ships; they get a byte-level tokenizer instead
(ids < 260, so it fits any T5 vocabulary). Real checkpoints bring their own T5 tokenizer.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

# Tokenizer slots that pad with "!" (id 0) in the published checkpoints; the others pad with EOS.
_PAD_WITH_BANG = {("sd21", "tokenizer"), ("sdxl", "tokenizer_2"), ("sdxl-refiner", "tokenizer_2")}
_PAD_WITH_BANG |= {("sd3", "tokenizer_2")}
_T5_SLOTS = {("sd3", "tokenizer_3"), ("flux", "tokenizer_2")}


def clip_files() -> tuple[Path, Path]:
    root = Path(str(resources.files("imagegenx.models") / "tokenizers" / "clip"))
    return root / "vocab.json", root / "merges.txt"


@cache
def _clip(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_files()
    return CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=77)


@cache
def _bytes_t5():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab.update({ch: len(specials) + i for i, ch in enumerate(sorted(byte_chars))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tokenizer_for(family: str, slot: str):
    """The shipped tokenizer for one tokenizer slot of a pipeline of this family."""
    if (family, slot) in _T5_SLOTS:
        return _bytes_t5()
    return _clip("!" if (family, slot) in _PAD_WITH_BANG else "<|endoftext|>")
