"""`LMGen`: the streaming step with PersonaPlex's token bookkeeping (MODEL.md §6, flat formulation),
replayed voice embeddings and the token-cache handover (§7.3), and the batched prefill (§7.5).

    gen = LMGen(model, lmgen_cfg, text=SamplingParams(0.7, 25), audio=SamplingParams(0.8, 250),
                greedy=False, seed=None, kv_bits=None)  # kv_bits=8: an 8-bit KV ring
    gen.reset()
    out = gen.step(user_codes=codes8, forced={channel: token}, embedding=None,
                   force_agent_silence=False)

State: for channels k = 0..16 and absolute positions p, `tok[k][p]` and `forced[k][p]` (a 4-slot ring
indexed p mod 4 holds them), the step counter `s` (`gen.position`) and the temporal KV ring.
Position 0 holds every channel's initial id, forced; position 1 the delayed channels' initial id,
forced; these initial entries win over anything written there later.

`step` at step s:
1. writes every supplied token — `forced` ({channel: token}), `user_codes` (channels 9..16) and the
   interrupt tokens — at position s + delay[channel], marked forced;
2. at s = 0 stops there and returns None (step 0 only writes, §6.4);
3. runs the temporal transformer on position s−1 (`embed(tok[:, s−1])`, or `embedding` — a stored
   [d] vector from a `.pt` voice — instead), samples the text token, then the depformer for
   K = `model.depformer_steps` codebooks, each conditioned on the token *used* at the previous step
   (the forced value if forced, else the sample); unforced channels at position s receive the
   samples;
4. returns the 17 tokens of real time s−1 — channel k from position s−1+delay[k] — for s ≥ 2, else
   None. So the text and agent cb0 come from the previous step and the acoustic codebooks from this
   one (Moshi's acoustic delay).

User codes given at step s are first read at step s+1 (cb0) and s+2 (acoustic). With K = 8 (live
PersonaPlex) the user channels are never generated: pass user codes at every step (or force them).
A Kyutai-style dep_q-16 model run with `depformer_steps=16` and no user input generates the user
codebooks itself.

Kyutai's `LMGen` (moshi 0.2.13) writes a call's user input at offset + delay and reads the same
offset, so its call o computes what this class's step o+1 computes, with its input written one step
earlier: pass the input of its call o to `step` at s = o, then run one more step (whose user codes
are never read); step s ≥ 1 then reproduces call s−1.

`prefill(embeddings, token_frames, token_cache)` runs the teacher-forced prompt phases in one
batched causal forward and leaves the state of the frame-by-frame path (see its docstring).

`force_agent_silence=True` forces this step's text to PAD (`existing_text_padding_id`) and the agent
codebooks to the lmgen SILENCE tokens through the same path as prompt frames (positions s + delay),
so frame s — emitted by the next step — is the silence frame, and the model's context agrees that
the agent stopped.

`step(embedding=e)` replays one voice-prompt embedding. Unless `forced` says otherwise it forces,
as NVIDIA's reference does while replaying, text PAD and audio id `card` on every channel at
position s; these never reach a later input (`set_token_cache` overwrites what is read next) but
they condition the discarded depformer outputs of the replay steps.

Sampling runs on the device with one evaluation barrier per step; the per-layer parts of the
temporal step and the whole text-head + depformer chain are compiled with `mx.compile` (fixed
shapes; `compile=False` runs the same functions eagerly); `greedy=True` (or temperature 0)
takes the argmax. `seed` makes draws reproducible (an explicit `mx.random` key per generator).
`reference` ("nvidia" / "kyutai", default `model.reference`: NVIDIA's fork for the PersonaPlex
layout, Kyutai's `moshi` for Moshi's) picks the PyTorch implementation to reproduce where they
differ: the streaming attention window past the context (kv_ring.py, and the depth ring of
depformer.py), and what conditions the next depth step when the channel is forced — NVIDIA's LMGen
uses the forced token, Kyutai's (which never forces generated channels) always the sample, which
matters at position 1, whose acoustic channels hold the initial token.

`last_text_logits`, `last_hidden` (numpy, float32) and `last_audio_logits` (MLX, only with
`keep_audio_logits=True`) are kept for tests and telemetry.
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from engine.config import LMGenConfig
from engine.mxops import at

from . import fused, sample_kernel
from .model import LMModel
from .sampling import AUDIO_DEFAULT, TEXT_DEFAULT, SamplingParams, sample

UNSET = -2  # "no token here yet": must never reach an embedding
RING = 4


def default_early_submit() -> bool:
    """Whether a live frame hands the temporal step (and then the depth chain) to the device as
    soon as each is built (`mx.async_eval`, no wait), so the device starts while Python builds
    the rest of the frame; the frame keeps its one barrier. On a GPU, yes (H200, one process:
    with ring attention and one-kernel draws, frame p50 13.7 -> 11.9 ms; docs/benchmarks.md); on
    the CPU backend, where the stages share the same cores, no. PARLEY_EARLY_SUBMIT=0/1 forces it."""
    forced = os.environ.get("PARLEY_EARLY_SUBMIT", "")
    if forced in ("0", "1"):
        return forced == "1"
    return mx.default_device().type == mx.DeviceType.gpu


def default_presubmit() -> bool:
    """Whether a live frame, once done, hands the next frame's temporal step to the device
    before returning. Step s+1's temporal transformer reads only position s's tokens (this
    frame's samples and user codes), all known when frame s ends, so it can run while the host
    waits for the next 80 ms of audio: a live frame's latency then no longer includes the 7B
    step, and back to back the host's cost of issuing it overlaps the device's work. The tokens
    are the same either way (tests/test_presubmit.py). PARLEY_PRESUBMIT=0 turns it off."""
    return os.environ.get("PARLEY_PRESUBMIT", "1") != "0"


def default_chain_ahead() -> bool:
    """Whether, with presubmit, the next frame's temporal step is built before the frame's
    barrier from the samples still on the device (and, with the engine's codes on the device,
    this frame's user codes too), so the device starts it right behind the frame's decode. On
    MLX's CUDA backend, yes (H200, 4 bits, with the codes on the device: 8.98 -> 7.58-8.02 ms a
    frame back to back; docs/benchmarks.md, session 14); on the CPU backend, where building
    ahead competes with the frame's own work for the same cores, and on Metal until measured
    there, no. PARLEY_CHAIN_AHEAD=0/1 forces it. The tokens are the same either way."""
    forced = os.environ.get("PARLEY_CHAIN_AHEAD", "")
    if forced in ("0", "1"):
        return forced == "1"
    return fused.on_cuda()


class _Pending:
    """A temporal step handed to the device ahead of its frame (LMGen.submit_next_temporal)."""

    def __init__(self, s: int, kv_end: int, hn: mx.array, submit_ms: float):
        self.s, self.kv_end, self.hn, self.submit_ms = s, kv_end, hn, submit_ms


class LMGen:
    def __init__(self, model: LMModel, lmgen_cfg: LMGenConfig | None = None,
                 text: SamplingParams = TEXT_DEFAULT, audio: SamplingParams = AUDIO_DEFAULT,
                 greedy: bool = False, seed: int | None = None, keep_audio_logits: bool = False,
                 reference: str | None = None, compile: bool = True,
                 kv_bits: int | None = None):
        self.model = model
        self.cfg = model.cfg
        self.lmgen_cfg = lmgen_cfg
        self._frame = None
        self._text_params, self._audio_params, self._greedy = text, audio, greedy
        self.seed = seed
        self._keep_audio_logits = keep_audio_logits
        cfg = self.cfg
        self.num_channels = cfg.n_q + 1
        self.delays = np.array(cfg.delays, dtype=np.int64)
        self.initial = np.array([cfg.text_card] + [cfg.card] * cfg.n_q, dtype=np.int64)
        self.pad_id = cfg.existing_text_padding_id
        self.reference = reference or model.reference
        if self.reference not in ("nvidia", "kyutai"):
            raise ValueError(f"reference must be 'nvidia' or 'kyutai', got {reference!r}")
        self.kv = model.new_kv(self.reference, kv_bits)
        self.compile = compile
        self.early_submit = default_early_submit()
        self.presubmit = default_presubmit()
        # With presubmit: build the next step before the frame's barrier, from the samples still
        # on the device, so it queues right behind the frame's decode (default_chain_ahead).
        self.chain_ahead = default_chain_ahead()
        self._pending: _Pending | None = None
        self._unfinished = None  # (Future of user codes, position) of a frame awaiting them
        self._kernel_notice: str | None = None
        # The depth transformer's CUDA kernels where they can run: one kernel per step
        # (engine/lm/depth_kernel.py), else four fused kernels per layer (engine/lm/fused.py).
        self._depth_path = self._best_depth_path()
        model.temporal.use_fused = (os.environ.get("PARLEY_FUSED_TEMPORAL", "1") != "0"
                                    and model.temporal.can_fuse(model.dtype))
        model.temporal.ring_attention = (model.temporal.use_fused
                                         and os.environ.get("PARLEY_RING_ATTENTION") != "0"
                                         and model.temporal.can_attend_fused(
                                             model.cfg.dim // model.cfg.num_heads,
                                             self.kv.quantized))
        # The temporal step as engine/lm/temporal_kernel.py's kernels (a few layers a launch),
        # where they run; PARLEY_TEMPORAL_KERNEL=0 keeps the fused step.
        model.temporal.step_kernel = (model.temporal.ring_attention
                                      and os.environ.get("PARLEY_TEMPORAL_KERNEL") != "0"
                                      and model.temporal.can_run_step_kernel(
                                          model.dtype, model.cfg.dim // model.cfg.num_heads))
        self._key = None
        self._last = {}  # "hidden" / "text_logits": evaluated MLX arrays, numpy on access
        self.last_audio_logits: mx.array | None = None
        self.last_text_sampled: int | None = None
        self.last_audio_sampled: np.ndarray | None = None
        self.reset()

    # -------------------------------------------------------------------------------------------
    # State
    # -------------------------------------------------------------------------------------------

    # Sampling settings may change between sessions; the (compiled) frame function bakes them in,
    # so changing one rebuilds it at the next step.
    @property
    def text_params(self) -> SamplingParams:
        return self._text_params

    @text_params.setter
    def text_params(self, value: SamplingParams) -> None:
        self._text_params, self._frame = value, None

    @property
    def audio_params(self) -> SamplingParams:
        return self._audio_params

    @audio_params.setter
    def audio_params(self, value: SamplingParams) -> None:
        self._audio_params, self._frame = value, None

    @property
    def greedy(self) -> bool:
        return self._greedy

    @greedy.setter
    def greedy(self, value: bool) -> None:
        self._greedy, self._frame = bool(value), None

    @property
    def keep_audio_logits(self) -> bool:
        return self._keep_audio_logits

    @keep_audio_logits.setter
    def keep_audio_logits(self, value: bool) -> None:
        self._keep_audio_logits, self._frame = bool(value), None

    DEPTH_PATHS = ("mlx", "fused", "kernel")

    def _best_depth_path(self) -> str:
        dep, dtype = self.model.depformer, self.model.dtype
        if dep.can_run_step_kernel(dtype):
            return "kernel"
        return "fused" if dep.can_fuse(dtype) else "mlx"

    @property
    def one_kernel_draws(self) -> bool:
        """Whether the frame draws each sampled token in one CUDA kernel (sample_kernel.py)."""
        return sample_kernel.enabled() and not self.greedy

    @property
    def depth_path(self) -> str:
        """How the live depth transformer runs: "mlx" (MLX operations), "fused" (four fused
        CUDA kernels a layer) or "kernel" (one CUDA kernel a step)."""
        return self._depth_path

    @depth_path.setter
    def depth_path(self, value: str) -> None:
        dep, dtype = self.model.depformer, self.model.dtype
        if value not in self.DEPTH_PATHS:
            raise ValueError(f"depth_path must be one of {self.DEPTH_PATHS}, got {value!r}")
        if value == "fused" and not dep.can_fuse(dtype):
            raise ValueError("the fused kernels need MLX's CUDA backend and a supported layout")
        if value == "kernel" and not dep.can_run_step_kernel(dtype):
            raise ValueError("the depth step kernel needs MLX's CUDA backend and a supported layout")
        self._depth_path, self._frame = value, None

    def check_depth_kernel(self) -> str | None:
        """On the step-kernel paths (depth, and the temporal one if on): if a grid barrier gave
        up (the GPU could not hold the whole grid at once, e.g. shared with other work), switches
        to the per-layer kernels and returns one sentence saying so; else None. Costs one small
        read from the device each."""
        temporal = self.model.temporal
        if temporal.step_kernel and temporal.step_kernel_failed():
            self.discard_pending()  # computed by the kernel that failed
            temporal.forget_barrier()
            temporal.step_kernel = False
            return ("The temporal transformer's step kernel could not get the whole GPU at once "
                    "and was switched to the per-layer kernels; the last few frames may sound "
                    "wrong.")
        dep = self.model.depformer
        if self._depth_path != "kernel" or not dep.step_kernel_failed():
            return None
        dep.forget_barrier()
        self._depth_path = "fused" if dep.can_fuse(self.model.dtype) else "mlx"
        self._frame = None
        return ("The depth transformer's one-kernel-a-step path could not get the whole GPU at "
                "once and was switched to the per-layer kernels; the last few frames may sound "
                "wrong.")

    @property
    def fused(self) -> bool:
        """Whether the depth transformer runs through CUDA kernels of ours (either kind)."""
        return self._depth_path != "mlx"

    @fused.setter
    def fused(self, value: bool) -> None:
        if value and not self.model.depformer.can_fuse(self.model.dtype):
            raise ValueError("the fused kernels need MLX's CUDA backend and a supported layout")
        self.depth_path = self._best_depth_path() if value else "mlx"

    def _last_np(self, name: str) -> np.ndarray | None:
        v = self._last.get(name)
        if v is None:
            return None
        if isinstance(v, mx.array):  # converted on first access only (no work when unused)
            v = self._last[name] = np.array(v.astype(mx.float32))
        return v

    @property
    def last_hidden(self) -> np.ndarray | None:
        """out_norm output [d] of the last transformer step (float32)."""
        return self._last_np("hidden")

    @property
    def last_text_logits(self) -> np.ndarray | None:
        """Text logits [text_card] of the last transformer step (float32)."""
        return self._last_np("text_logits")

    @property
    def position(self) -> int:
        """s: the index of the next step."""
        return self.s

    def reset(self, seed: int | None = None) -> None:
        """Clears the conversation: s = 0, empty KV ring, initial tokens at positions 0 and 1."""
        if seed is not None:
            self.seed = seed
        if getattr(self, "_unfinished", None) is not None:
            try:  # lets the encode worker finish before the state is dropped
                self.finish_frame()
            except Exception:  # noqa: BLE001 - its codes are being dropped with the state
                pass
        self._unfinished = None
        self.discard_pending()
        self.s = 0
        self.kv.reset()
        self._tok = np.full((self.num_channels, RING), UNSET, dtype=np.int64)
        self._forced = np.zeros((self.num_channels, RING), dtype=bool)
        self._slot_pos = np.full(RING, -1, dtype=np.int64)
        self._claim(0)
        self._tok[:, 0] = self.initial
        self._forced[:, 0] = True
        self._claim(1)
        delayed = self.delays > 0
        self._tok[delayed, 1] = self.initial[delayed]
        self._forced[delayed, 1] = True
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._key = mx.random.key(seed)
        self._last = {}
        self.last_audio_logits = None

    def _claim(self, p: int) -> int:
        """The ring slot of position p, cleared if it held an older position."""
        i = p % RING
        if self._slot_pos[i] != p:
            if self._slot_pos[i] > p:
                raise RuntimeError(f"position {p} is no longer in the token window")
            self._slot_pos[i] = p
            self._tok[:, i] = UNSET
            self._forced[:, i] = False
        return i

    def _is_initial(self, k: int, p: int) -> bool:
        return p == 0 or (p == 1 and self.delays[k] > 0)

    def _write(self, k: int, p: int, v: int) -> None:
        if self._is_initial(k, p):
            return
        i = self._claim(p)
        self._tok[k, i] = int(v)
        self._forced[k, i] = True

    def tokens_at(self, p: int) -> np.ndarray:
        """The 17 tokens currently held for position p (UNSET = −2 where none)."""
        i = p % RING
        if self._slot_pos[i] != p:
            return np.full(self.num_channels, UNSET, dtype=np.int64)
        return self._tok[:, i].copy()

    def forced_at(self, p: int) -> np.ndarray:
        i = p % RING
        if self._slot_pos[i] != p:
            return np.zeros(self.num_channels, dtype=bool)
        return self._forced[:, i].copy()

    def _next_key(self) -> mx.array:
        if self.greedy:
            return self._key
        self._key, sub = mx.random.split(self._key)
        return sub

    def _make_frame(self):
        """The text head, text sampling and the depformer chain of one step, as one function of
        (hn, forced mask [K+1], forced values [K+1], key) -> (tokens [K+1], text logits
        [, audio logits [K, card]]); compiled with `mx.compile` unless `compile=False`. The token
        conditioning depth step j+1 is the forced value where the mask says so, else the sample."""
        model = self.model
        dep = model.depformer
        K = model.depformer_steps
        rule, greedy, keep, path = self.reference, self.greedy, self.keep_audio_logits, self.depth_path
        tp, ap = self.text_params, self.audio_params

        # One kernel a token for the top-k draw (engine/lm/sample_kernel.py, CUDA), its Gumbel
        # noise drawn once per frame; greedy draws keep the argmax.
        one_kernel = self.one_kernel_draws

        def frame(hn, mask, vals, key):
            keys = [None] * (K + 1)
            if not greedy:
                split = mx.random.split(key, K + 1)
                keys = [at(split, j) for j in range(K + 1)]
            text_logits = model.text_logits(hn)[0, 0]
            forced = sample_kernel.forced_pairs(mask, vals) if one_kernel else None
            audio_noise = []  # [K, card] Gumbel noise for the depth steps, made on first use

            def draw(logits, params, j, noise):
                """Token j of the frame -> (sampled, the token conditioning the next step)."""
                if one_kernel and not params.greedy:
                    return sample_kernel.sample_topk(logits, noise(), params.temp, params.top_k,
                                                     forced, j)
                tok = sample(logits, params, keys[j], greedy)
                return tok, mx.where(at(mask, j), at(vals, j), tok)

            def audio_row(j):
                if not audio_noise:
                    audio_noise.append(mx.random.gumbel((K, model.cfg.card), key=keys[1]))
                return at(audio_noise[0], j)

            t, prev = draw(text_logits, tp, 0, lambda: mx.random.gumbel(text_logits.shape, key=keys[0]))
            toks, logits_all = [t], []
            cache = dep.new_cache()
            kvs = []  # with the step kernel: each step's keys and values
            for j in range(K):
                if path == "kernel":
                    first = max(0, j - dep.capacity + 2) if rule == "nvidia" else 0  # depformer.py
                    logits, kv = dep.step_kernel(j, hn, prev, kvs[first:])
                    kvs.append(kv)
                else:
                    logits = dep.step(j, hn, prev.reshape(1, 1), cache, rule,
                                      path == "fused")[0, 0]
                a, prev = draw(logits, ap, j + 1, lambda: audio_row(j))
                toks.append(a)
                logits_all.append(logits)
            out = [mx.stack(toks), text_logits]
            if keep:
                out.append(mx.stack(logits_all))
            return out

        return mx.compile(frame) if self.compile else frame

    def _ext_writes(self, user_codes, forced, force_agent_silence: bool,
                    replay: bool) -> dict[int, int]:
        cfg = self.cfg
        ext: dict[int, int] = {}
        if replay and forced is None:
            ext[0] = self.pad_id
            for k in range(1, self.num_channels):
                ext[k] = cfg.card
        if force_agent_silence:
            if self.lmgen_cfg is None:
                raise ValueError("force_agent_silence needs the lmgen configuration (silence tokens)")
            ext[0] = self.pad_id
            for i, t in enumerate(self.lmgen_cfg.silence_tokens):
                ext[1 + i] = int(t)
        if forced is not None:
            items = forced.items() if isinstance(forced, Mapping) else enumerate(forced)
            for k, v in items:
                if v is None:
                    continue
                k = int(k)
                if not 0 <= k < self.num_channels:
                    raise ValueError(f"channel {k} does not exist (0..{self.num_channels - 1})")
                ext[k] = int(v)
        if user_codes is not None:
            uc = np.asarray(user_codes).reshape(-1)
            nu = cfg.n_q // 2
            if uc.shape[0] != nu:
                raise ValueError(f"user_codes must have {nu} codebooks, got {uc.shape[0]}")
            for i in range(nu):
                ext[1 + nu + i] = int(uc[i])
        for k, v in ext.items():
            top = self.initial[k]  # the initial id is the largest valid input id
            if not -1 <= v <= top:
                raise ValueError(f"token {v} on channel {k} is out of range (-1..{top})")
        return ext

    def set_token_cache(self, cache: np.ndarray) -> None:
        """Installs a `.pt` voice's token ring [17, R] (slot p mod R holds position p for
        p = s−R+1 .. s) as forced tokens (MODEL.md §7.3). Call after the replay steps."""
        cache = np.asarray(cache).reshape(self.num_channels, -1)
        R = cache.shape[1]
        if R > RING:
            raise ValueError(f"a token cache has at most {RING} slots, got {R}")
        if cache.min() < -1 or (cache.max(axis=1) > self.initial).any():
            raise ValueError("the token cache holds ids outside the vocabularies")
        for p in range(self.s - R + 1, self.s + 1):
            if p < 0:
                continue
            for k in range(self.num_channels):
                self._write(k, p, int(cache[k, p % R]))

    # -------------------------------------------------------------------------------------------
    # Step
    # -------------------------------------------------------------------------------------------

    def _input_row(self, p: int) -> np.ndarray:
        row = self.tokens_at(p)
        bad = np.nonzero(row == UNSET)[0]
        if bad.size:
            raise RuntimeError(
                f"no token for channel {int(bad[0])} at position {p}: pass user codes (or force "
                "the channel) at every step")
        return row

    def step(self, user_codes: Sequence[int] | np.ndarray | None = None,
             forced: Mapping[int, int] | Sequence[int] | None = None,
             embedding: np.ndarray | mx.array | None = None,
             force_agent_silence: bool = False) -> np.ndarray | None:
        """One step (see the module docstring). Returns int64 [17] for real time s−1, or None."""
        self.finish_frame()
        self.discard_pending()
        s = self.s
        if embedding is not None and s == 0:
            raise ValueError("step 0 only writes tokens: call step() once before replaying voice "
                             "embeddings (they belong to steps 1..N-1)")
        ext = self._ext_writes(user_codes, forced, force_agent_silence, embedding is not None)
        for k, v in ext.items():
            self._write(k, s + int(self.delays[k]), v)
        if s == 0:
            self.s = 1
            return None
        model = self.model
        if embedding is not None:
            x = mx.array(embedding).reshape(1, 1, -1).astype(model.dtype)
        else:
            x = model.embed_step(self._input_row(s - 1), compiled=self.compile)
        hn = model.hidden(x, self.kv, compiled=self.compile)  # [1, 1, d]
        slot = self._claim(s)
        forced_s = self._forced[:, slot]
        tok_s = self._tok[:, slot]
        K = model.depformer_steps
        mask = forced_s[: K + 1] & (self.reference == "nvidia")
        vals = np.where(mask, tok_s[: K + 1], 0).astype(np.int32)
        if self._frame is None:
            self._frame = self._make_frame()
        outs = self._frame(hn, mx.array(mask), mx.array(vals), self._next_key())
        sampled, text_logits = outs[0], outs[1]
        audio_logits = outs[2] if self.keep_audio_logits else None
        mx.eval(sampled, hn, text_logits, *outs[2:], *self.kv.arrays())  # the one barrier
        vals = np.array(sampled).astype(np.int64)
        for k in range(K + 1):
            if not forced_s[k]:
                self._tok[k, slot] = vals[k]
        self._last = {"hidden": hn[0, 0], "text_logits": text_logits}
        self.last_audio_logits = audio_logits
        self.last_text_sampled = int(vals[0])
        self.last_audio_sampled = vals[1:].copy()
        self.s = s + 1
        if s <= int(self.delays.max()):
            return None
        return np.array([self.tokens_at(s - 1 + int(self.delays[k]))[k]
                         for k in range(self.num_channels)], dtype=np.int64)

    def step_live(self, user_codes: mx.array, decode, force_agent_silence: bool = False,
                  timings: dict | None = None, submit_next: bool | None = None,
                  user_later: bool = False, check_kernels: bool = False, issued=None):
        """A live frame with one evaluation barrier (MODEL.md §11.6): `user_codes` may be the lazy
        output of Mimi's encoder and `decode(codes[8])` a lazy Mimi decode; the temporal step, the
        depformer, the encode and the decode of the emitted frame all run in one `mx.eval`.

        This works because step s never reads what it writes: the user codes of this frame land at
        positions s and s+1 (read from the next step on), and the emitted frame s−1 needs only
        host-known tokens plus this step's acoustic samples, which are selected on the device.
        Returns (emitted tokens int64 [17], decoded pcm (evaluated), user codes int64 [8]).
        With `timings` (a dict), barriers are added between stages and their milliseconds stored
        under encode / temporal / depth / decode, for telemetry and the benchmark.
        submit_next (default `self.presubmit`): end by handing the next frame's temporal step to
        the device (`submit_next_temporal`). user_later, with a Future for `user_codes` and no
        `timings`: return as soon as the output is ready (user codes None), without waiting for
        the encode; `finish_frame()` writes them (no submission then: the caller submits).
        check_kernels: `check_depth_kernel()` once this frame's kernels are done and before the
        next step is issued (reading the barrier flags would otherwise wait for that step); its
        sentence, if any, is kept for `take_kernel_notice()`.
        issued: called once the frame's own work (depth chain, decode) is handed to the device
        and before anything waits for `user_codes` (e.g. to queue the encode that resolves them).
        """
        self.finish_frame()
        s = self.s
        if s < 2 or self.reference != "nvidia":
            raise RuntimeError("step_live runs after the prompt prefill of a PersonaPlex session")
        ext = self._ext_writes(None, None, force_agent_silence, False)
        for k, v in ext.items():
            self._write(k, s + int(self.delays[k]), v)
        clock = time.perf_counter
        t0 = clock()
        deferred = hasattr(user_codes, "result")  # a Future of (codes, ms) from another thread
        if timings is not None:
            if not deferred:
                mx.eval(user_codes)
            t1 = clock()
            timings["encode"] = (t1 - t0) * 1000
        model = self.model
        pending = self._take_pending(s)
        if pending is not None:  # handed to the device when the last frame ended
            hn = pending.hn
        else:
            x = model.embed_step(self._input_row(s - 1), compiled=self.compile)
            hn = model.hidden(x, self.kv, compiled=self.compile)
        if timings is not None:
            mx.eval(hn, *self.kv.arrays())
            t2 = clock()
            # A pre-submitted step counts what it adds to this frame: issuing it, then the wait.
            timings["temporal"] = (t2 - t1) * 1000 + (pending.submit_ms if pending else 0.0)
        elif self.early_submit and pending is None:
            mx.async_eval(hn, *self.kv.arrays())
        slot = self._claim(s)
        forced_s = self._forced[:, slot]
        tok_s = self._tok[:, slot]
        K = model.depformer_steps
        mask = forced_s[: K + 1].copy()
        vals = np.where(mask, tok_s[: K + 1], 0).astype(np.int32)
        if self._frame is None:
            self._frame = self._make_frame()
        outs = self._frame(hn, mx.array(mask), mx.array(vals), self._next_key())
        sampled, text_logits = outs[0], outs[1]
        if timings is not None:
            mx.eval(sampled, *outs[2:])
            t3 = clock()
            timings["depth"] = (t3 - t2) * 1000
        elif self.early_submit:
            mx.async_eval(sampled, text_logits, *outs[2:])
        # The emitted frame s-1: delay-0 channels from position s-1 (host), delayed ones from
        # position s (forced, or this step's samples).
        n = self.cfg.n_q // 2
        prev_row = self.tokens_at(s - 1)
        agent = range(1, n + 1)
        take_host = np.array([self.delays[k] == 0 or forced_s[k] for k in agent])
        host_vals = np.array([prev_row[k] if self.delays[k] == 0 else tok_s[k] for k in agent])
        codes = mx.where(mx.array(take_host), mx.array(np.where(take_host, host_vals, 0)
                                                      .astype(np.int32)), sampled[1:n + 1])
        pcm = decode(codes)
        if issued is not None:
            if timings is None:
                mx.async_eval(sampled, pcm, text_logits, *outs[2:])
            issued()
        kv_arrays = self.kv.arrays()
        later = deferred and user_later and timings is None
        chained = None
        if (self.chain_ahead and timings is None and not later and not check_kernels
                and K == n and (self.presubmit if submit_next is None else submit_next)):
            # The frame's own work to the device first, then the next step built on its samples
            # (still on the device) and queued behind it, before this frame's barrier.
            mx.async_eval(sampled, pcm, text_logits, *outs[2:])
            chained = self._chain_next(s, sampled, mask, vals, user_codes, deferred)
        mx.eval(sampled, pcm, text_logits, hn, *outs[2:], *kv_arrays,
                *([] if deferred else [user_codes]))
        if timings is not None:
            timings["decode"] = (clock() - t3) * 1000
        if deferred and not later:  # the encode ran alongside; its own time is the encode stage
            user_codes, encode_ms = user_codes.result()
            if timings is not None:
                timings["encode"] = encode_ms
        if check_kernels:
            self._kernel_notice = self.check_depth_kernel() or self._kernel_notice
        sampled_np = np.array(sampled).astype(np.int64)
        for k in range(K + 1):
            if not forced_s[k]:
                self._tok[k, slot] = sampled_np[k]
        self.s = s + 1
        if later:  # the frame's output needs none of its user codes: they are written later
            self._unfinished = (user_codes, s)
            user_np = None
        else:
            user_np = self._write_user_codes(user_codes, s)
            # Position s is complete: the next step can start on the device now, before the rest.
            if chained is not None:
                self._pending = chained
            elif self.presubmit if submit_next is None else submit_next:
                self.submit_next_temporal()
        self._last = {"hidden": hn[0, 0], "text_logits": text_logits}
        self.last_audio_logits = outs[2] if self.keep_audio_logits else None
        self.last_text_sampled = int(sampled_np[0])
        self.last_audio_sampled = sampled_np[1:].copy()
        emitted = np.array([self.tokens_at(s - 1 + int(self.delays[k]))[k]
                            for k in range(self.num_channels)], dtype=np.int64)
        return emitted, pcm, user_np

    def _chain_next(self, s: int, sampled: mx.array, mask: np.ndarray, vals: np.ndarray,
                    user_codes, deferred: bool) -> _Pending | None:
        """Step s+1's temporal transformer built before frame s's barrier (chain_ahead): its
        input row s from this frame's samples on the device (or the forced values), this
        frame's delay-0 user codes (the encode worker's, waited for here, or the lazy codes) and
        the delayed user channels already written at s. None if row s is not complete."""
        t0 = time.perf_counter()
        row_s = self.tokens_at(s)
        users = range(len(mask), self.num_channels)
        now = np.array([self.delays[k] == 0 for k in users])
        held = np.array([row_s[k] for k in users])
        if (held[~now] < 0).any():  # a delayed user channel not written: build it later
            return None
        if deferred:
            got = user_codes.result()[0]
            if isinstance(got, mx.array):  # queued on the encode worker's stream: MLX waits
                codes = got.reshape(-1).astype(mx.int32)  # for it on the device, not here
            else:
                codes = mx.array(np.asarray(got).reshape(-1).astype(np.int32))
        else:
            codes = user_codes.reshape(-1).astype(mx.int32)
        model_part = mx.where(mx.array(mask), mx.array(vals), sampled.astype(mx.int32))
        user_part = mx.where(mx.array(now), codes[: len(now)],
                             mx.array(np.where(now, 0, held).astype(np.int32)))
        model = self.model
        x = model.embed_row(mx.concatenate([model_part, user_part]), compiled=self.compile)
        hn = model.hidden(x, self.kv, compiled=self.compile)
        mx.async_eval(hn, *self.kv.arrays())
        return _Pending(s + 1, self.kv.end, hn, (time.perf_counter() - t0) * 1000)

    def _write_user_codes(self, user_codes, s: int) -> np.ndarray:
        user_np = np.array(user_codes).astype(np.int64).reshape(-1)
        for k, v in self._ext_writes(user_np, None, False, False).items():
            self._write(k, s + int(self.delays[k]), v)
        return user_np

    def take_kernel_notice(self) -> str | None:
        """The sentence of the last `check_kernels` that switched a kernel off, once."""
        notice, self._kernel_notice = self._kernel_notice, None
        return notice

    @property
    def frame_unfinished(self) -> bool:
        """Whether the last `step_live(user_later=True)` still waits for its user codes."""
        return self._unfinished is not None

    def finish_frame(self) -> np.ndarray | None:
        """After `step_live(..., user_later=True)`: waits for the frame's user codes (the encode
        worker's Future), writes them and returns them (int64 [8]); None if nothing waits. Every
        other step, reset and submission finishes a waiting frame first."""
        if self._unfinished is None:
            return None
        (future, s), self._unfinished = self._unfinished, None
        codes, _ = future.result()
        return self._write_user_codes(codes, s)

    def submit_next_temporal(self) -> None:
        """Builds step s's temporal transformer (its input, position s−1, is complete once frame
        s−1 has ended) and hands it to the device without waiting; the next `step_live` picks it
        up. Anything else that changes the state first (`step`, `reset`) discards it."""
        self.finish_frame()
        self.discard_pending()
        t0 = time.perf_counter()
        s = self.s
        model = self.model
        x = model.embed_step(self._input_row(s - 1), compiled=self.compile)
        hn = model.hidden(x, self.kv, compiled=self.compile)
        mx.async_eval(hn, *self.kv.arrays())
        self._pending = _Pending(s, self.kv.end, hn, (time.perf_counter() - t0) * 1000)

    def _take_pending(self, s: int) -> _Pending | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.s == s and pending.kv_end == self.kv.end:
            return pending
        self._pending = pending  # made for another state: undo it
        self.discard_pending()
        return None

    @property
    def has_pending(self) -> bool:
        """Whether a temporal step was handed to the device ahead of its frame."""
        return self._pending is not None

    def discard_pending(self) -> None:
        """Drops a pre-submitted temporal step: waits for it (its kernels write the KV ring in
        place) and takes its position back off the ring, whose slot the next step rewrites."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        mx.eval(pending.hn, *self.kv.arrays())
        self.kv.end -= 1

    # -------------------------------------------------------------------------------------------
    # Batched prefill
    # -------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Traces the live frame's compiled functions (temporal step, text head and depformer
        chain) on throwaway inputs, and on a GPU evaluates them once so their kernels are
        compiled too (MLX's CUDA backend JIT-compiles each new kernel, the fused ones included):
        the first live frame after a prompt then runs at speed instead of stalling the
        conversation. The state (KV ring, tokens, sampling key) is untouched. On the CPU the
        outputs are not evaluated: there is nothing to JIT, and it would cost a frame."""
        if not self.compile:
            return
        model = self.model
        x = mx.zeros((1, 1, self.cfg.dim), dtype=model.dtype)
        outs = model.temporal.warm_up(x, self.kv)
        if self._frame is None:
            self._frame = self._make_frame()
        K = model.depformer_steps
        outs += self._frame(x, mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32),
                            mx.random.key(0))
        if mx.default_device().type == mx.DeviceType.gpu:
            mx.eval(outs)

    def prefill(self, embeddings: np.ndarray | None, token_frames: np.ndarray,
                token_cache: np.ndarray | None = None) -> None:
        """Teacher-forced prompt phases in one causal forward (MODEL.md §7.5), from a fresh state.

        embeddings: a `.pt` voice's stored input embeddings [N−1, d] (or None for a WAV voice,
        whose frames are then the first rows of `token_frames`); token_cache: its [17, 4] ring;
        token_frames [F, 17]: every later prompt frame, all channels given (silence spacer, text
        prompt, silence spacer). Leaves exactly the state that `step()` fed the same frames one by
        one (step(), then step(embedding=e) for each embedding, set_token_cache, then
        step(forced=frame) per frame) leaves: s = P, the KV ring, the token window,
        `last_hidden`/`last_text_logits`; only the sampling key is not advanced. Evaluated before
        returning.
        """
        if self.s != 0:
            raise RuntimeError("prefill starts from a fresh state: call reset() first")
        frames = np.asarray(token_frames, dtype=np.int64).reshape(-1, self.num_channels)
        model = self.model
        rows: list[np.ndarray] = []
        n_emb = 0
        if embeddings is not None:
            emb = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.cfg.dim)
            n_emb = emb.shape[0]
            if token_cache is None:
                raise ValueError("a replayed voice needs its token cache")
            self.s = 1  # step 0: nothing to write
            for _ in range(n_emb):
                for k, v in self._ext_writes(None, None, False, True).items():
                    self._write(k, self.s + int(self.delays[k]), v)
                self.s += 1
            self.set_token_cache(token_cache)
        for f in frames:
            s = self.s
            for k in range(self.num_channels):
                self._write(k, s + int(self.delays[k]), int(f[k]))
            if s >= 1:
                rows.append(self._input_row(s - 1))
            self.s = s + 1
        parts = []
        if n_emb:
            parts.append(mx.array(emb).astype(model.dtype)[None])
        if rows:
            parts.append(model.embed(mx.array(np.stack(rows).astype(np.int32))))
        if not parts:
            return
        x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        hn = model.hidden(x, self.kv)
        last = hn[:, -1:]
        text_logits = model.text_logits(last)[0, 0]
        mx.eval(last, text_logits, *self.kv.arrays())
        self._last = {"hidden": last[0, 0], "text_logits": text_logits}
        self.last_audio_logits = None
