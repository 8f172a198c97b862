"""Mimi's split residual vector quantizer (moshi `SplitResidualVectorQuantizer`, MODEL.md §10.1).

* semantic: z₁ = rvq_first.input_proj(latent); code₀ = nearest centroid of level 0;
* acoustic: z₂ = rvq_rest.input_proj(the same latent); residual VQ over the first
  (num_codebooks − 1) levels: code = nearest centroid to r, then r −= that centroid;
* codebook rows = embedding_sum / max(cluster_usage, 1e-5);
* decode = rvq_first.output_proj(c₀) + rvq_rest.output_proj(Σ acoustic centroids).

Distances use the expansion ‖x‖² − 2x·c + ‖c‖², as `torch.cdist` does for these sizes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine.mxops import at

CLUSTER_USAGE_EPS = 1e-5


def codebook_vectors(embedding_sum: np.ndarray, cluster_usage: np.ndarray) -> np.ndarray:
    """The centroids of one level, in float32 exactly as the reference computes them."""
    usage = np.maximum(cluster_usage.astype(np.float32), np.float32(CLUSTER_USAGE_EPS))
    return (embedding_sum.astype(np.float32) / usage[:, None]).astype(np.float32)


class _Codebook:
    def __init__(self, centroids: np.ndarray, table: mx.array | None = None):
        self.c = mx.array(centroids) if table is None else table  # [bins, d]
        self.c_norm = mx.sum(self.c * self.c, axis=-1)  # [bins]

    def nearest(self, x: mx.array) -> mx.array:
        """x [T, d] -> int32 codes [T]."""
        x_norm = mx.sum(x * x, axis=-1, keepdims=True)
        # c.T is a view (no transposed copy kept): the product reads c's rows as its columns.
        dist = (x_norm - 2.0 * (x @ self.c.T)) + self.c_norm
        return mx.argmin(dist, axis=-1).astype(mx.int32)

    def lookup(self, codes: mx.array) -> mx.array:
        return mx.take(self.c, codes, axis=0)


class _Branch:
    """One residual VQ (rvq_first or rvq_rest) with its 1×1 input/output projections."""

    def __init__(self, input_proj: np.ndarray, output_proj: np.ndarray, levels: list[np.ndarray]):
        self.input_proj = mx.array(np.ascontiguousarray(input_proj[:, :, 0].T))  # [D, d]
        self.output_proj = mx.array(np.ascontiguousarray(output_proj[:, :, 0].T))  # [d, D]
        # The levels' tables end to end, for `decode`'s one gather; each level's table is a
        # view of it.
        self.bins = int(levels[0].shape[0]) if levels else 0
        self.stacked = mx.array(np.concatenate(levels, axis=0)) if levels else None
        self.levels = [_Codebook(c, self.stacked[i * self.bins:(i + 1) * self.bins])
                       for i, c in enumerate(levels)]
        if levels:
            mx.eval(self.stacked, [level.c for level in self.levels])

    def encode(self, latent: mx.array, n: int) -> list[mx.array]:
        residual = latent @ self.input_proj
        codes = []
        for level in self.levels[:n]:
            c = level.nearest(residual)
            codes.append(c)
            if len(codes) < n:
                residual = residual - level.lookup(c)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        """codes [n, T] (levels 0..n−1) -> [T, D]: the levels' vectors summed in order, then
        projected. All levels are looked up with one gather over the tables laid end to end
        (level i's code c is row i·bins + c): on MLX's CUDA backend a gather costs ~27 µs to
        issue, and this runs in every frame's decode."""
        n = codes.shape[0]
        offsets = mx.arange(n, dtype=codes.dtype)[:, None] * self.bins
        vecs = mx.take(self.stacked, codes + offsets, axis=0)  # [n, T, d]
        q = at(vecs, 0)
        for i in range(1, n):
            q = q + at(vecs, i)
        return q @ self.output_proj


class SplitRVQ:
    def __init__(self, first: _Branch, rest: _Branch, num_codebooks: int):
        self.first = first
        self.rest = rest
        self.num_codebooks = num_codebooks

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray], n_q_stored: int, num_codebooks: int):
        def levels(branch: str, n: int):
            pre = f"quantizer.{branch}.vq.layers"
            return [codebook_vectors(w[f"{pre}.{i}._codebook.embedding_sum"],
                                     w[f"{pre}.{i}._codebook.cluster_usage"]) for i in range(n)]

        # Only the levels in use are kept (the acoustic branch uses num_codebooks − 1 of them).
        first = _Branch(w["quantizer.rvq_first.input_proj.weight"],
                        w["quantizer.rvq_first.output_proj.weight"], levels("rvq_first", 1))
        rest = _Branch(w["quantizer.rvq_rest.input_proj.weight"],
                       w["quantizer.rvq_rest.output_proj.weight"],
                       levels("rvq_rest", max(num_codebooks - 1, 0)))
        return cls(first, rest, num_codebooks)

    def encode(self, latent: mx.array) -> mx.array:
        """latent [T, D] -> int32 codes [num_codebooks, T]."""
        codes = self.first.encode(latent, 1)
        if self.num_codebooks > 1:
            codes += self.rest.encode(latent, self.num_codebooks - 1)
        return mx.stack(codes, axis=0)

    def decode(self, codes: mx.array) -> mx.array:
        """codes [num_codebooks, T] -> latent [T, D]."""
        out = self.first.decode(codes[:1])
        if codes.shape[0] > 1:
            out = out + self.rest.decode(codes[1:])
        return out
