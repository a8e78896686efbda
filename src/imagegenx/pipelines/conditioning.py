"""The UNet's conditioning inputs for a batch of samples, built once while the batch stays the same.

Prompt embeddings, SDXL's pooled embeddings and micro-conditioning, the distilled-guidance
embedding and InstantID face embeddings depend only on which samples are in the batch, not on the
step. A multi-step batch (LCM-4, 30-step SDXL) rebuilt them at every step, one small tensor per
row each; ``ConditioningCache`` keeps the last batch's concatenated tensors and reuses them while
the same samples, in the same order, come back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imagegenx.pipelines.sample import Sample


@dataclass
class Conditioning:
    rows: int  # UNet rows, padding included
    encoder_states: torch.Tensor
    attention_mask: torch.Tensor | None
    text_embeds: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL
    timestep_cond: torch.Tensor | None = None  # LCM-distilled UNets
    faces: torch.Tensor | None = None  # InstantID face embeddings, zero on negative rows


class ConditioningCache:
    def __init__(
        self, device: torch.device, dtype: torch.dtype, is_xl: bool, guidance_dim: int | None
    ) -> None:
        self.device, self.dtype, self.is_xl, self.guidance_dim = device, dtype, is_xl, guidance_dim
        self._samples: list[Sample] = []
        self._key: tuple = ()
        self._value: Conditioning | None = None

    def get(self, samples: list[Sample], padded_rows: int, identity: object) -> Conditioning:
        """``padded_rows``: pad to this many rows with copies of the last (static compiled shapes);
        ``identity``: the InstantID adapter of the batch (its change invalidates the cache)."""
        key = (padded_rows, id(identity))
        same = len(samples) == len(self._samples) and all(
            a is b for a, b in zip(samples, self._samples, strict=True)
        )
        if self._value is None or not same or key != self._key:
            self._value = self._build(samples, padded_rows)
            self._samples, self._key = list(samples), key
        return self._value

    def clear(self) -> None:
        self._samples, self._key, self._value = [], (), None

    def _build(self, samples: list[Sample], padded_rows: int) -> Conditioning:
        hidden, pooled, time_ids, guidance, faces = [], [], [], [], []
        for s in samples:
            pairs = [(s.uncond, s.uncond_pooled, s.uncond_time_ids, True)] if s.guided else []
            pairs.append((s.cond, s.cond_pooled, s.cond_time_ids, False))
            for embeds, pool, ids, negative in pairs:
                hidden.append(embeds)
                pooled.append(pool)
                time_ids.append(ids)
                guidance.append(s.job.guidance_scale)
                if s.identity is not None:  # InstantID's negative rows see a zero face embedding
                    faces.append(torch.zeros_like(s.identity) if negative else s.identity)
        extra = padded_rows - len(hidden)
        for values in (hidden, pooled, time_ids, guidance, faces):
            values += values[-1:] * extra
        encoder_states, attention_mask = pad_sequences(hidden)
        result = Conditioning(len(hidden), encoder_states, attention_mask)
        if self.is_xl:
            result.text_embeds, result.time_ids = torch.cat(pooled), torch.cat(time_ids)
        if self.guidance_dim is not None:
            w = torch.tensor(guidance, device=self.device) - 1.0
            result.timestep_cond = guidance_embedding(w, self.guidance_dim, self.dtype)
        if faces:
            result.faces = torch.cat(faces)
        return result


def pad_sequences(hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack prompt embeddings of different lengths (long prompts have 77·k tokens).

    Shorter rows are zero-padded and the padding is masked out of cross-attention, so a row's
    result is the same as without neighbours; when all lengths agree, no mask is used at all.
    """
    longest = max(h.shape[1] for h in hidden)
    if all(h.shape[1] == longest for h in hidden):
        return torch.cat(hidden), None
    padded, mask = [], []
    for h in hidden:
        missing = longest - h.shape[1]
        padded.append(torch.nn.functional.pad(h, (0, 0, 0, missing)))
        row = torch.ones(longest, device=h.device)
        row[h.shape[1] :] = 0
        mask.append(row)
    return torch.cat(padded), torch.stack(mask)


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for LCM-distilled UNets (Luo et al., 2023)."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=w.device, dtype=torch.float32) * -(np.log(10000.0) / (half - 1))
    )
    emb = w.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
