"""`DuplexEngine`: Mimi + the LM + a persona as one full-duplex step per 80 ms frame.

It implements the frame contract (`engine.frames.FrameModel`) used by the live session, the
offline pipeline and the benchmark:

    engine = DuplexEngine.load("tiny", quantize=None, dtype="float32", greedy=True)
    engine.start(persona)             # reset + batched prefill of voice and prompt (MODEL.md §7)
    result = engine.step(pcm_1920)    # encode -> LM step -> decode, one evaluation per stage group

All MLX work happens on the thread that calls these methods.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from engine.errors import VoiceError
from engine.frames import FrameResult
from engine.model_dir import ModelDir, resolve_model
from engine.personas import Persona
from engine.prompts import PAD_ID, TextTokenizer
from engine.voices import VoicePrompt, WavVoice, list_voices, load_voice, ensure_voices_unpacked


@dataclass(frozen=True)
class PreparedPrompt:
    """Everything a prefill needs, computed once per persona (so switching back is instant)."""

    embeddings: np.ndarray | None  # a .pt/.safetensors voice's stored input embeddings
    token_cache: np.ndarray | None
    frames: np.ndarray  # [F, 17] teacher-forced frames (WAV voice frames, spacers, text prompt)
    text_tokens: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        voice = 0 if self.embeddings is None else self.embeddings.shape[0] + 1
        return voice + self.frames.shape[0]


def resolve_kv_bits(kv_bits: int | None | str, quantize: int | None) -> int | None:
    """The KV ring's width for a `kv_bits` setting ("auto", 8, 16 or None) and the weights'
    quantization: 8 or None (the model's dtype)."""
    if kv_bits == "auto":
        return 8 if quantize else None
    if kv_bits in (None, 16):
        return None
    if kv_bits == 8:
        return 8
    raise ValueError(f"kv_bits must be 'auto', 8 or 16, got {kv_bits!r}")


def resolve_mimi_weights(mimi_weights: str, quantize: int | None) -> str:
    """How Mimi's transformer matrices are stored for a setting ("auto", "float32",
    "bfloat16") and the LM's quantization: bf16 with quantized weights under "auto"."""
    if mimi_weights == "auto":
        return "bfloat16" if quantize else "float32"
    if mimi_weights in ("float32", "bfloat16"):
        return mimi_weights
    raise ValueError(f"mimi_weights must be 'auto', 'float32' or 'bfloat16', got {mimi_weights!r}")


def default_overlap_encode() -> bool:
    """Whether Mimi's encode overlaps the LM step by default: on MLX's CUDA backend only."""
    from engine.lm import fused
    return fused.on_cuda()


class DuplexEngine:
    DEPTH_CHECK_EVERY = 25  # live frames between checks of the depth step kernel (2 s of audio)

    def __init__(self, model_dir: ModelDir, lm, mimi, tokenizer: TextTokenizer, *,
                 dtype: str, quantize: int | None, greedy: bool = False, seed: int | None = None,
                 overlap_encode: bool | None = None, kv_bits: int | None = None):
        import mlx.core as mx
        from engine.lm import LMGen

        self.mx = mx
        self.model_dir = model_dir
        self.config = model_dir.config
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.quantize = quantize
        self.greedy = greedy
        self.seed = seed
        self.sample_rate = self.config.mimi.sample_rate
        self.frame_size = self.config.mimi.frame_size
        # kv_bits=8 stores the temporal KV ring in 8 bits (engine/lm/kv_ring.py): half its
        # memory, and half the bytes the attention reads each frame.
        self.kv_bits = kv_bits
        self.gen = LMGen(lm, self.config.lmgen, greedy=greedy, seed=seed, kv_bits=kv_bits)
        self.profile_stages = False  # per-stage barriers on every frame (the benchmark)
        # Live telemetry samples the stage split on one frame in this many (0: never); the
        # other frames keep one evaluation barrier.
        self.stage_sample_every = 8
        # Mimi's encode of a frame runs on a worker thread (its own MLX stream) while this
        # thread builds and issues the LM step, which never reads this frame's user codes
        # (MODEL.md §11.6). On CUDA the frame is bound by issuing work from the CPU, so the two
        # overlap: on by default there (H100: 23.5 -> 16.1 ms a frame, docs/benchmarks.md). Off
        # on the CPU backend, where the stages compete for the same cores and nothing is
        # gained, and on Metal until measured there. None = that default.
        self._encode_pool = None
        self._encode_stream = None
        self._worker_resets = -1  # encoder_resets when the encoder state was last made concrete
        # With overlap_encode: the worker hands a frame's codes over as a device array as soon
        # as their encode is queued on its stream, instead of as host integers once it is done.
        # A next step chained ahead (LMGen.chain_ahead) then takes them on the device (MLX makes
        # the main stream wait for the encode stream's event), so the host no longer waits for
        # the encode (which the persistent kernels starve until ~7.5 ms into a frame) before
        # issuing that step; the host reads the codes after the frame's barrier. On by default
        # where the encode overlaps (H200: the next step then starts 0.1 ms after the decode
        # instead of ~1-3 ms; docs/benchmarks.md, session 14); PARLEY_CODES_ON_DEVICE=0/1
        # forces it.
        forced = os.environ.get("PARLEY_CODES_ON_DEVICE", "")
        self.codes_on_device = (forced == "1" if forced in ("0", "1")
                                else default_overlap_encode())
        self._overlap_encode = False
        self.overlap_encode = default_overlap_encode() if overlap_encode is None else overlap_encode
        # With overlap_encode: queue a live frame's encode only once the frame's depth chain and
        # decode are handed to the device, so the worker's Python does not compete for the GIL
        # while this thread issues them (the real-time latency's critical path). Opt-in
        # (PARLEY_ENCODE_AFTER=1) until measured on a GPU.
        self.encode_after_issue = os.environ.get("PARLEY_ENCODE_AFTER") == "1"
        self._frames = 0
        self._last_live = False
        self.persona: Persona | None = None
        self.last_user_codes = np.zeros(self.config.lmgen.mimi_num_codebooks, np.int64)
        self.last_prefill_frames = 0
        self._prepared: dict[tuple, PreparedPrompt] = {}
        self._warm_up_codec()

    def _warm_up_codec(self) -> None:
        """Runs the codec once so every array it derived from its weights is evaluated here: MLX
        arrays left lazy belong to the loading thread's stream and fail on the model thread."""
        mx = self.mx
        self.mimi.reset()
        codes = self.mimi.encode_step(np.zeros(self.frame_size, np.float32))
        mx.eval(codes, self.mimi.decode_step(codes))
        self.mimi.reset()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str | ModelDir | None = None, *, quantize: int | None = None,
             dtype: str | None = None, greedy: bool = False, seed: int | None = None,
             depformer_steps: int | None = None, group_size: int = 64,
             kv_bits: int | None | str = "auto", quantize_tables: bool = True,
             mimi_weights: str = "auto") -> "DuplexEngine":
        """Quantized weights (`quantize`) make a memory-lean engine, already not the reference's
        numbers, so by default three more cuts come with them (the 7B at 4 bits: ~7.0 -> ~5.4 GB):
        kv_bits "auto": an 8-bit KV ring (0.83 instead of 1.57 GB; 16 or None: the model's
        dtype); quantize_tables: the embedding tables and output heads quantized too
        (LMModel.load's quantize_embeddings / quantize_heads; ~0.26 instead of ~0.92 GB);
        mimi_weights "auto": Mimi's transformer matrices stored in bf16 ("float32" keeps them;
        0.1 GB). Without `quantize` all three keep the reference's precision."""
        from engine.lm import LMModel
        from engine.mimi import Mimi

        model_dir = model if isinstance(model, ModelDir) else resolve_model(model)
        cfg = model_dir.config
        if dtype is None:
            dtype = "float32" if cfg.lm.dim < 1024 else "bfloat16"  # small test models: fp32
        if quantize is None:  # 8 bits is the safe default for the 7B (MODEL.md §4.4)
            quantize = 8 if cfg.lm.dim >= 1024 else 0
        quantize = quantize or None
        mimi = Mimi.load(model_dir.mimi_path, cfg.mimi, num_codebooks=cfg.lmgen.mimi_num_codebooks,
                         transformer_weights=resolve_mimi_weights(mimi_weights, quantize))
        lm = LMModel.load(model_dir.lm_path, cfg.lm, dtype=dtype, quantize=quantize,
                          group_size=group_size, depformer_steps=depformer_steps,
                          quantize_embeddings=quantize_tables, quantize_heads=quantize_tables)
        tokenizer = TextTokenizer.from_model_dir(model_dir.path)
        return cls(model_dir, lm, mimi, tokenizer, dtype=dtype, quantize=quantize,
                   greedy=greedy, seed=seed, kv_bits=resolve_kv_bits(kv_bits, quantize))

    def available_voices(self) -> list[str]:
        ensure_voices_unpacked(self.model_dir.path)
        return list(list_voices(self.model_dir.path))

    # -- prompts ------------------------------------------------------------------------------

    def _voice(self, persona: Persona) -> VoicePrompt | WavVoice:
        if not persona.voice:
            raise VoiceError(f"Persona {persona.name} has no voice; give it one (--voice NAME).")
        ensure_voices_unpacked(self.model_dir.path)
        voice = load_voice(persona.voice, self.model_dir.path)
        if isinstance(voice, VoicePrompt) and voice.dim != self.config.lm.dim:
            raise VoiceError(
                f"Voice {voice.name} was made for a model of width {voice.dim}, but this model's "
                f"width is {self.config.lm.dim}; use a voice of this model.")
        return voice

    def prepare(self, persona: Persona) -> PreparedPrompt:
        """Tokenizes the prompt and encodes or reads the voice (MODEL.md §7.1-§7.3)."""
        key = (persona.voice, persona.prompt)
        if key in self._prepared:
            return self._prepared[key]
        lmgen = self.config.lmgen
        n_agent = lmgen.audio_tokens_per_stream
        silence = np.asarray(lmgen.silence_tokens, np.int64)
        sine = np.asarray(lmgen.sine_tokens, np.int64)
        pad = lmgen.zero_text_code

        def frame(text: int, agent: np.ndarray) -> np.ndarray:
            return np.concatenate([[text], agent, sine]).astype(np.int64)

        voice = self._voice(persona)
        rows: list[np.ndarray] = []
        embeddings = cache = None
        if isinstance(voice, VoicePrompt):
            embeddings, cache = voice.embeddings, voice.cache
        else:
            codes = self._encode_clip(voice.audio)  # [N, 8], streaming from a fresh state
            if codes.shape[0] == 0:
                raise VoiceError(f"Voice {voice.name} has no audio; use a clip of a few seconds.")
            rows.extend(frame(pad, codes[i, :n_agent]) for i in range(codes.shape[0]))
        text_tokens = tuple(self.tokenizer.encode_prompt(persona.prompt or ""))
        spacer = [frame(pad, silence)] * lmgen.audio_silence_frame_cnt
        rows.extend(spacer)
        rows.extend(frame(t, silence) for t in text_tokens)
        rows.extend(spacer)
        prepared = PreparedPrompt(embeddings, cache, np.stack(rows), text_tokens)
        self._prepared[key] = prepared
        return prepared

    def _encode_clip(self, pcm: np.ndarray) -> np.ndarray:
        mx = self.mx
        self._settle()  # the encode worker must be done with the encoder first
        self.mimi.reset()
        frames = -(-len(pcm) // self.frame_size)
        padded = np.zeros(frames * self.frame_size, np.float32)
        padded[: len(pcm)] = pcm
        codes = []
        for i in range(frames):
            c = self.mimi.encode_step(padded[i * self.frame_size:(i + 1) * self.frame_size])
            mx.eval(c)
            codes.append(np.array(c))
        self.mimi.reset()
        return np.stack(codes).astype(np.int64) if codes else np.zeros((0, 8), np.int64)

    # -- the frame contract -------------------------------------------------------------------

    def start(self, persona: Persona) -> float:
        """Resets the conversation and prefills `persona`; returns the seconds it took."""
        self._settle()
        t0 = time.perf_counter()
        prepared = self.prepare(persona)
        self.gen.text_params, self.gen.audio_params = _sampling_for(persona)
        self.mimi.reset()
        self.gen.reset(self.seed)
        self.gen.prefill(prepared.embeddings, prepared.frames, prepared.token_cache)
        self.gen.warm_up()  # the first live frame would otherwise compile everything
        self.mimi.reset()
        self.persona = persona
        self.last_prefill_frames = prepared.num_steps
        return time.perf_counter() - t0

    def reset(self) -> None:
        self._settle()
        if self.persona is not None:
            self.start(self.persona)
        else:
            self.mimi.reset()
            self.gen.reset(self.seed)

    def step(self, pcm_in: np.ndarray, *, force_agent_silence: bool = False,
             defer_next: bool = False) -> FrameResult:
        """One frame: encode, LM step, decode, with one evaluation barrier (per-stage barriers
        when `profile_stages` is set, for the stage split). The frame ends by handing the next
        frame's temporal step to the device (LMGen.presubmit); with `defer_next` that waits for
        `after_step()`, so a live session can send the output on its way first."""
        mx = self.mx
        self._settle()
        t0 = time.perf_counter()
        n = self.config.lmgen.audio_tokens_per_stream
        live = self.gen.position >= 2 and self.gen.reference == "nvidia"
        if not (live and self.overlap_encode):
            codes = self.mimi.encode_step(np.asarray(pcm_in, np.float32))
            if self.overlap_encode:  # the worker may carry on from this state: leave it evaluated
                mx.eval(codes, *self.mimi.encoder_state_arrays())
                self._worker_resets = self.mimi.encoder_resets
        self._frames += 1
        self._last_live = live
        every = self.stage_sample_every
        profile = self.profile_stages or (every > 0 and self._frames % every == 0)
        if live:
            timings: dict[str, float] | None = {} if profile else None
            issued = None
            if self.overlap_encode and self.encode_after_issue:
                # The encode queued only once the frame's own work is on the device (its Python
                # would otherwise hold the GIL while this thread issues the depth chain).
                from concurrent.futures import Future
                codes = Future()

                def issued(future=codes, pcm=pcm_in):
                    self._queue_encode(pcm, future)
            elif self.overlap_encode:
                codes = self._queue_encode(pcm_in)
            # The next temporal step is handed over as the frame ends, except for the bench's
            # stage split (profile_stages: whole stages) and with defer_next, where the frame
            # returns once its audio is ready (before its own encode is done) and after_step()
            # takes the user codes and issues it. Every DEPTH_CHECK_EVERY live frames the step
            # kernels' barrier flags are read (a switch's sentence becomes FrameResult.notice),
            # before the next step, which writes them, is issued.
            out, pcm, user_codes = self.gen.step_live(
                codes, self.mimi.decode_step, force_agent_silence, timings,
                submit_next=False if self.profile_stages or defer_next else None,
                user_later=defer_next,
                check_kernels=self._frames % self.DEPTH_CHECK_EVERY == 1, issued=issued)
            timings = timings or {}
        else:  # before any prompt (Moshi-style start): the plain step with three barriers
            mx.eval(codes)
            user_codes = np.array(codes).astype(np.int64)
            t1 = time.perf_counter()
            out = self.gen.step(user_codes=user_codes, force_agent_silence=force_agent_silence)
            t2 = time.perf_counter()
            if out is None:
                out = np.concatenate([[PAD_ID], self.config.lmgen.silence_tokens,
                                      user_codes]).astype(np.int64)
            pcm = self.mimi.decode_step(out[1:1 + n])
            mx.eval(pcm)
            timings = {"encode": (t1 - t0) * 1000, "temporal": (t2 - t1) * 1000, "depth": 0.0,
                       "decode": (time.perf_counter() - t2) * 1000}
        pcm_np = np.array(pcm, dtype=np.float32)
        timings["total"] = (time.perf_counter() - t0) * 1000
        if user_codes is not None:  # else after_step() sets them
            self.last_user_codes = user_codes
        text_id = int(out[0])
        notice = self.gen.take_kernel_notice() if live else None
        return FrameResult(pcm=pcm_np, tokens=out, text_id=text_id,
                           text=self._display(text_id), timings_ms=timings, notice=notice)

    def after_step(self) -> None:
        """After a `step(..., defer_next=True)` whose output has been handed over: the frame's
        own user codes (waiting for its encode, if still running), then the next frame's
        temporal step to the device, as `step` would have done at its end."""
        self._settle()
        gen = self.gen
        if (self._last_live and gen.presubmit and not self.profile_stages
                and not gen.has_pending):
            gen.submit_next_temporal()

    def _settle(self) -> None:
        """Finishes a frame that returned before its encode was done (step's defer_next): its
        user codes written, the encode worker done with the encoder. Everything that touches
        the conversation or the codec calls this first."""
        codes = self.gen.finish_frame()
        if codes is not None:
            self.last_user_codes = codes
        if self.codes_on_device and self._encode_pool is not None:
            self._encode_pool.submit(lambda: None).result()  # the last encode job has ended

    @property
    def frame_path(self) -> str:
        """The speed paths a live frame takes beyond plain MLX operations (for the dashboard);
        empty when none."""
        parts = []
        if self.overlap_encode:
            parts.append("encode overlapped")
        path = self.gen.depth_path
        if path != "mlx":
            parts.append("depth one kernel a step" if path == "kernel" else "depth fused")
        temporal = self.gen.model.temporal
        if temporal.use_fused and temporal.step_kernel:
            parts.append("temporal step kernel")
        elif temporal.use_fused:
            parts.append("temporal fused" + (" + ring attention" if temporal.ring_attention else ""))
        if self.gen.one_kernel_draws:
            parts.append("one-kernel draws")
        if self.gen.early_submit:
            parts.append("stages submitted early")
        if self.gen.presubmit:
            parts.append("next temporal step submitted ahead"
                         + (" (built before the barrier)" if self.gen.chain_ahead else ""))
        if self.mimi.decoder_transformer.kernel:
            parts.append("Mimi transformer kernels")
        return ", ".join(parts)

    @property
    def overlap_encode(self) -> bool:
        return self._overlap_encode

    @overlap_encode.setter
    def overlap_encode(self, value: bool) -> None:
        """May change between frames: the encoder's state, built lazily on this thread so far,
        is made concrete first, since the worker's stream cannot evaluate it."""
        value = bool(value)
        if hasattr(self, "gen"):
            self._settle()
        if value and not self._overlap_encode:
            self.mx.eval(*self.mimi.encoder_state_arrays())
            self._worker_resets = self.mimi.encoder_resets
        self._overlap_encode = value

    def close(self) -> None:
        """Drains the encode worker, if one was started (its thread itself lives on; see
        `_EncodeWorker`)."""
        self._settle()
        if self._encode_pool is not None:
            self._encode_pool.submit(lambda: None).result()

    def _encode_worker(self):
        if self._encode_pool is None:
            self._encode_pool = _EncodeWorker("parley-encode")
        return self._encode_pool

    def _encode_frame(self, pcm_in, early=None) -> tuple[np.ndarray, float] | None:
        """On the encode worker: one frame's codes as int64 numpy, and the milliseconds it took;
        with `early` (a Future), instead resolves it with the codes as a device array once they
        are queued, and returns None. Everything it leaves behind (the encoder's state) is
        evaluated here, since MLX arrays left lazy on one thread's stream fail on another."""
        mx = self.mx
        t0 = time.perf_counter()
        if self._encode_stream is None:
            self._encode_stream = mx.new_stream(mx.default_device())
        with mx.stream(self._encode_stream):
            if self._worker_resets != self.mimi.encoder_resets:  # reset elsewhere: redo it here
                self.mimi.reset_encoder()
                self._worker_resets = self.mimi.encoder_resets
            codes = self.mimi.encode_step(np.asarray(pcm_in, np.float32))
            if early is not None:
                # Queued, not waited for: the codes go to the model thread now, then this
                # thread waits for the encoder's state (nothing running is left to another).
                # The codes are that thread's from here: touching them here (an eval marks an
                # array done) would race with its graph building.
                mx.async_eval(codes, *self.mimi.encoder_state_arrays())
                early.set_result((codes, (time.perf_counter() - t0) * 1000))
                mx.eval(*self.mimi.encoder_state_arrays())
                return None
            mx.eval(codes, *self.mimi.encoder_state_arrays())
        return np.array(codes).astype(np.int64), (time.perf_counter() - t0) * 1000

    def _encode_frame_early(self, future, pcm_in) -> None:
        """On the encode worker, with codes_on_device: `_encode_frame` resolving `future` with
        the frame's codes as a device array once they are queued (or with its error)."""
        try:
            self._encode_frame(pcm_in, early=future)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
            raise

    def _queue_encode(self, pcm_in, future=None):
        """The frame's encode on the worker -> a Future of (codes, ms): host integers once done,
        or with codes_on_device a device array once queued. `future`: the Future to resolve."""
        from concurrent.futures import Future
        worker = self._encode_worker()
        future = Future() if future is None else future
        if self.codes_on_device:
            worker.submit(self._encode_frame_early, future, pcm_in)
        else:
            worker.submit_to(future, self._encode_frame, pcm_in)
        return future

    def _display(self, text_id: int) -> str | None:
        # A model may sample ids its tokenizer lacks (random-weight benchmarks pair a 32000-entry
        # head with a small tokenizer): show nothing rather than stop the conversation.
        if text_id >= self.tokenizer.vocab_size:
            return None
        return self.tokenizer.display_piece(text_id) or None

    def json_piece(self, text_id: int) -> str:
        if text_id >= self.tokenizer.vocab_size:
            return f"<{text_id}>"
        return self.tokenizer.json_piece(text_id)


def _sampling_for(persona: Persona):
    from engine.lm.sampling import AUDIO_DEFAULT, TEXT_DEFAULT, SamplingParams

    text = SamplingParams(
        temp=persona.text_temperature if persona.text_temperature is not None else TEXT_DEFAULT.temp,
        top_k=persona.text_top_k if persona.text_top_k is not None else TEXT_DEFAULT.top_k)
    audio = SamplingParams(
        temp=persona.audio_temperature if persona.audio_temperature is not None else AUDIO_DEFAULT.temp,
        top_k=persona.audio_top_k if persona.audio_top_k is not None else AUDIO_DEFAULT.top_k)
    return text, audio


class _EncodeWorker:
    """One daemon thread running submitted calls in order, returning futures. Not a
    ThreadPoolExecutor: a thread that has used its own MLX stream and then exits (as a pool's
    thread does at the interpreter's exit) sometimes aborts the process inside MLX (0.32), so
    this thread never exits; being a daemon, it does not hold the process open either."""

    def __init__(self, name: str):
        import queue
        import threading
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)

    def submit(self, fn, *args):
        from concurrent.futures import Future
        return self.submit_to(Future(), fn, *args)

    def submit_to(self, future, fn, *args):
        """`submit` resolving a Future made beforehand (handed out before the call is queued)."""
        self._jobs.put((future, fn, args))
        return future
