"""Prompt encoding with A1111's attention syntax and prompts longer than CLIP's 77 tokens.

CLIP has 77 positions, so a long prompt is cut into chunks of 75 tokens, each chunk is wrapped in
BOS/EOS, encoded on its own and the chunks are concatenated along the sequence; the UNet's
cross-attention accepts any sequence length. This is what A1111 does, so prompts written for it
(weights, BREAK, long lists of tags) give the same conditioning here.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

FAMILIES = ("sd15", "sd21", "sdxl", "sdxl-refiner")
CHUNK_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
BREAK = ("BREAK", -1.0)  # marker in parse_prompt_attention's output, as in A1111

_ROUND, _SQUARE = 1.1, 1 / 1.1
_ATTENTION_RE = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]?)         # \( \) \[ \] \\ ; a stray backslash is dropped, as in A1111
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)        # "(text:1.3)": closes a round bracket with a weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs using A1111's emphasis syntax.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w, brackets nest and
    multiply; unclosed brackets apply to the rest of the prompt and unmatched closers are plain
    text, as in A1111. Each `BREAK` becomes the `BREAK` marker ("BREAK", -1.0) (unlike A1111, the
    marker is never scaled by surrounding brackets).
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            if tuple(item) != BREAK:
                item[1] *= factor

    for m in _ATTENTION_RE.finditer(text):
        weight = m["weight"]
        if m["escape"] is not None:
            if len(m["escape"]) > 1:
                res.append([m["escape"][1], 1.0])
        elif m["open"] is not None:
            (round_open if m["open"] == "(" else square_open).append(len(res))
        elif weight is not None and round_open and _is_float(weight):
            scale(round_open.pop(), float(weight))
        elif m["close"] == ")" and round_open:
            scale(round_open.pop(), _ROUND)
        elif m["close"] == "]" and square_open:
            scale(square_open.pop(), _SQUARE)
        else:  # plain text, including unmatched closers and stray colons
            for i, part in enumerate(_BREAK_RE.split(m[0])):
                if i > 0:
                    res.append(list(BREAK))
                if part:
                    res.append([part, 1.0])

    for start in round_open:
        scale(start, _ROUND)
    for start in square_open:
        scale(start, _SQUARE)

    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and BREAK not in (tuple(merged[-1]), tuple(item)):
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _token_id(tokenizer, token: str) -> int | None:
    """Id of a vocabulary entry, or None; cheaper than building get_vocab()'s 49k-entry dict."""
    ident = tokenizer.convert_tokens_to_ids(token)
    return None if ident is None or ident == tokenizer.unk_token_id else ident


def pack_chunks(
    fragments: list[tuple[list[int], float] | None], comma_id: int | None
) -> list[tuple[list[int], list[float]]]:
    """Pack weighted token runs (None = BREAK) into chunks of at most 75 tokens, A1111-style.

    When a chunk overflows and its last comma lies within the final 20 tokens, the words after
    that comma move to the next chunk so a phrase is not split across two chunks.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def flush() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment is None:  # BREAK always closes the chunk, even an empty one (as A1111)
            flush()
            continue
        ids, weight = fragment
        for token in ids:
            if token == comma_id:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma >= CHUNK_TOKENS - COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                del tokens[cut:], weights[cut:]
                flush()
                tokens, weights = moved
            if len(tokens) == CHUNK_TOKENS:
                flush()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        flush()
    return chunks


@dataclass
class PromptEmbeddings:
    """Conditioning for one prompt; cached and shared, so treat the tensors as read-only."""

    hidden: torch.Tensor  # (1, 77*k, D)
    pooled: torch.Tensor | None = None  # (1, P), SDXL only


class PromptEncoder:
    """Encodes prompts for one model family, with a small LRU cache of recent results.

    The cache must be cleared (`clear_cache`) whenever the text encoders' weights change, e.g. when
    the set of LoRAs applied to them changes.
    """

    def __init__(self, tokenizers: list, text_encoders: list, family: str, cache_size: int = 32):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
        expected = 2 if family == "sdxl" else 1
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(f"{family} needs {expected} tokenizer(s) and text encoder(s)")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.family = family
        self._commas = [_token_id(tok, ",</w>") for tok in self.tokenizers]
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], PromptEmbeddings] = OrderedDict()
        self._generation = 0  # bumped by clear_cache so an encode racing with it is not cached
        self._lock = threading.Lock()

    def token_count(self, prompt: str) -> int:
        """Number of prompt tokens, without BOS/EOS, padding or BREAK markers."""
        return sum(len(f[0]) for f in self._fragments(self.tokenizers[0], prompt) if f is not None)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def encode(self, prompt: str, clip_skip: int = 1) -> PromptEmbeddings:
        """Encode a prompt; clip_skip follows A1111 (1 = last layer, 2 = one layer earlier, ...)."""
        return self.encode_many([(prompt, clip_skip)])[(prompt, clip_skip)]

    def encode_many(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], PromptEmbeddings]:
        """Each (prompt, clip_skip)'s embeddings: cached ones as they are, the rest encoded together,
        one text-encoder call per clip_skip for all their chunks (a batch's distinct prompts one at a
        time were most of a one-step job's engine time on a GPU: kernel launches, not arithmetic)."""
        layers = min(enc.config.num_hidden_layers for enc in self.text_encoders)
        for _, clip_skip in keys:
            if not 1 <= clip_skip <= layers:
                raise ValueError(f"clip_skip must be between 1 and {layers}, got {clip_skip}")
        found: dict[tuple[str, int], PromptEmbeddings] = {}
        with self._lock:
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
            generation = self._generation
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        for clip_skip in dict.fromkeys(skip for _, skip in missing):
            prompts = [prompt for prompt, skip in missing if skip == clip_skip]
            for prompt, embeddings in zip(prompts, self._encode(prompts, clip_skip), strict=True):
                found[(prompt, clip_skip)] = embeddings
        with self._lock:
            if generation == self._generation and self.cache_size > 0:
                for key in missing:
                    self._cache[key] = found[key]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return found

    @staticmethod
    def _fragments(tokenizer, prompt: str) -> list[tuple[list[int], float] | None]:
        parsed = parse_prompt_attention(prompt)
        texts = [t for t, w in parsed if (t, w) != BREAK]
        ids = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        return [None if (t, w) == BREAK else (next(ids), w) for t, w in parsed]

    def _chunk_tensors(self, tokenizer, comma: int | None, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (k, 77) and per-token weights (k, 77) for one tokenizer."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        rows, mults = [], []
        for tokens, weights in pack_chunks(self._fragments(tokenizer, prompt), comma):
            fill = CHUNK_TOKENS - len(tokens)
            rows.append([bos, *tokens, eos] + [pad] * fill)
            mults.append([1.0, *weights, 1.0] + [1.0] * fill)
        return torch.tensor(rows), torch.tensor(mults)

    @torch.no_grad()
    def _encode(self, prompts: list[str], clip_skip: int) -> list[PromptEmbeddings]:
        """The prompts' chunks through each text encoder in one call (CLIP's rows are independent:
        a causal mask, no padding mask), split back per prompt."""
        hiddens: list[list[torch.Tensor]] = [[] for _ in prompts]
        pooled: list[torch.Tensor | None] = [None] * len(prompts)
        for tokenizer, comma, encoder in zip(self.tokenizers, self._commas, self.text_encoders, strict=True):
            chunks = [self._chunk_tensors(tokenizer, comma, prompt) for prompt in prompts]
            ids = torch.cat([prompt_ids for prompt_ids, _ in chunks])
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if self.family in ("sd15", "sd21"):
                # Like diffusers: an earlier layer still goes through the final layer norm.
                # transformers >= 5.6 flattened CLIPTextModel (no `.text_model` wrapper any more).
                hidden = out.last_hidden_state
                if clip_skip > 1:
                    norm = getattr(encoder, "text_model", encoder).final_layer_norm
                    hidden = norm(out.hidden_states[-clip_skip])
            else:
                # SDXL conditions on the penultimate layer, without the final layer norm.
                hidden = out.hidden_states[-(clip_skip + 1)]
            first = 0
            for i, (prompt_ids, mults) in enumerate(chunks):
                rows = slice(first, first + len(prompt_ids))
                hiddens[i].append(_emphasize(hidden[rows], mults.to(hidden.device)))
                if self.family not in ("sd15", "sd21") and encoder is self.text_encoders[-1]:
                    pooled[i] = out.text_embeds[first : first + 1]  # from the first chunk, as A1111
                first += len(prompt_ids)
        results = []
        for parts, pool in zip(hiddens, pooled, strict=True):
            if len({h.shape[0] for h in parts}) != 1:
                raise RuntimeError("the tokenizers split this prompt into different numbers of chunks")
            hidden = torch.cat([h.to(parts[0].device) for h in parts], dim=-1)
            results.append(PromptEmbeddings(hidden=hidden.reshape(1, -1, hidden.shape[-1]), pooled=pool))
        return results


def _emphasize(hidden: torch.Tensor, mults: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token, then restore each chunk's mean.

    Restoring the mean keeps the overall magnitude of the conditioning, so weights shift attention
    between tokens instead of making the whole prompt louder or quieter.
    """
    if bool((mults == 1).all()):
        return hidden  # exact no-op, so unweighted prompts match diffusers bit for bit
    h = hidden.float()
    mean = h.mean(dim=(1, 2), keepdim=True)
    h = h * mults[..., None]
    new_mean = h.mean(dim=(1, 2), keepdim=True)
    # Layer-normed states can have a mean of ~0 (random or unusual encoders): dividing by it would
    # blow up, so the rescale is skipped when the mean is negligible next to the values themselves.
    meaningful = new_mean.abs() > 1e-3 * h.abs().mean(dim=(1, 2), keepdim=True)
    h = h * torch.where(meaningful, mean / new_mean, torch.ones_like(mean))
    return h.to(hidden.dtype)
