"""`SoundDeviceBackend`: real devices through sounddevice / PortAudio (AUDIO.md §4, §7).

* Two streams (`InputStream` + `OutputStream`; `duplex=True` uses one `sd.Stream` instead) with
  small device blocks: 10 ms at the opened rate by default (`blocksize=0` lets the host choose,
  suggested on macOS), `latency='low'`. Never 1920-sample blocks.
* 24 kHz is asked for first (`check_input_settings` / `check_output_settings`); if refused, the
  device's native rate is opened and the session converts with libsamplerate.
* Callbacks only hand the block to `RingIO` (copy, stamp, count) and bump a heartbeat.
* A supervisor thread is the watchdog: every 100 ms it checks the heartbeats; 500 ms without a
  callback means the device is lost. It then aborts and closes the streams on a helper thread,
  waiting at most `close_timeout_s` (a stream's `stop()` was seen to hang forever when the audio
  server died), re-initialises PortAudio so it sees the current devices, and retries opening every
  `reopen_interval_s` until it works or the backend is stopped. The session keeps the model fed
  with silent frames meanwhile.
* No PortAudio library, no device, a refused device, a lost device: each is a `BackendState` with a
  one-sentence `message`, never an exception.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from .base import AudioBackend, BackendState, DeviceInfo, InputCallback, OutputCallback


class _Refused(Exception):
    pass


class _NoDevice(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any, BaseException | None]:
    """Runs `fn` on a daemon helper thread; returns (finished, result, exception)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    th = threading.Thread(target=run, name=f"parley-audio-{name}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


def import_sounddevice() -> tuple[Any | None, str]:
    """(module, "") or (None, a sentence saying why sounddevice / PortAudio is unusable)."""
    try:
        import sounddevice as sd  # noqa: PLC0415
    except OSError:
        hint = "install it with: apt-get install libportaudio2" if sys.platform.startswith("linux") else "reinstall the sounddevice package"
        return None, f"the PortAudio library was not found; {hint}"
    except ImportError:
        return None, "the sounddevice package is not installed (pip install sounddevice)"
    except Exception as e:  # noqa: BLE001
        return None, f"sounddevice failed to load ({e})"
    return sd, ""


class SoundDeviceBackend(AudioBackend):
    name = "sounddevice"
    detects_silent_mic = True

    def __init__(
        self,
        input_device: int | str | None = None,
        output_device: int | str | None = None,
        samplerate: int = 24000,
        blocksize: int | None = None,
        latency: str | float = "low",
        duplex: bool = False,
        watchdog_s: float = 0.5,
        poll_s: float = 0.1,
        recover: bool = True,
        reopen_interval_s: float = 1.0,
        close_timeout_s: float = 1.5,
        open_timeout_s: float = 5.0,
    ):
        super().__init__()
        self.input_device = input_device
        self.output_device = output_device
        self.samplerate = int(samplerate)
        self.blocksize_request = blocksize
        self.latency = latency
        self.duplex = duplex
        self.watchdog_s = watchdog_s
        self.poll_s = poll_s
        self.recover = recover
        self.reopen_interval_s = reopen_interval_s
        self.close_timeout_s = close_timeout_s
        self.open_timeout_s = open_timeout_s
        self.portaudio_version = ""
        self.resampled = False
        self.callback_errors = 0
        self.hung_closes = 0
        self.reopen_attempts = 0
        self._sd = None
        self._streams: list[Any] = []
        self._hb_in = 0
        self._hb_out = 0
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._zombie = False
        self._attempt = 0
        self._lock = threading.RLock()  # serialises open / close between the supervisor and callers

    # ------------------------------------------------------------------ lifecycle
    def start(self, on_input: InputCallback, on_output: OutputCallback, wake: Callable[[], None] | None = None) -> None:
        self._on_input, self._on_output, self._wake = on_input, on_output, wake
        self._stop.clear()
        self._set_state(BackendState.OPENING, "opening the audio devices")
        sd, why = import_sounddevice()
        if sd is None:
            self._set_state(BackendState.NO_PORTAUDIO, why)
            return
        self._sd = sd
        try:
            self.portaudio_version = sd.get_portaudio_version()[1]
        except Exception:  # noqa: BLE001
            self.portaudio_version = "unknown"
        ok = self._open_guarded()
        if ok:
            self.generation += 1
        if self._supervisor is None or not self._supervisor.is_alive():
            self._supervisor = threading.Thread(target=self._supervise, name="parley-audio-watchdog", daemon=True)
            self._supervisor.start()

    def stop(self) -> None:
        self._stop.set()
        sup = self._supervisor
        if sup is not None and sup is not threading.current_thread():
            sup.join(timeout=self.close_timeout_s + 1.0)
        self._supervisor = None
        self._teardown()
        if not self.state.failed:
            self._set_state(BackendState.CLOSED, "")

    def restart(self) -> None:
        """Reopen now (e.g. after the silent-mic warning), re-reading the device list."""
        if self._sd is None or self._on_input is None:
            return self.start(self._on_input, self._on_output, self._wake) if self._on_input else None
        with self._lock:
            self._teardown()
            self._reinit_portaudio()
            if self._open_guarded():
                self.generation += 1
                self.restarts += 1

    # ------------------------------------------------------------------ devices
    def devices(self) -> list[DeviceInfo]:
        sd = self._sd
        if sd is None:
            sd, _ = import_sounddevice()
        if sd is None:
            return []
        try:
            devs = sd.query_devices()
            apis = sd.query_hostapis()
            d_in, d_out = sd.default.device
        except Exception:  # noqa: BLE001
            return []
        out = []
        for d in devs:
            try:
                api = apis[d["hostapi"]]["name"]
            except Exception:  # noqa: BLE001
                api = ""
            out.append(
                DeviceInfo(
                    index=d["index"],
                    name=d["name"],
                    max_input_channels=d["max_input_channels"],
                    max_output_channels=d["max_output_channels"],
                    default_samplerate=d["default_samplerate"],
                    hostapi=api,
                    is_default_input=d["index"] == d_in,
                    is_default_output=d["index"] == d_out,
                )
            )
        return out

    # ------------------------------------------------------------------ callbacks (PortAudio threads)
    def _in_cb(self, indata, frames, time_info, status) -> None:
        self._hb_in += 1
        try:
            t = time_info.inputBufferAdcTime or time_info.currentTime
            self._on_input(indata[:, 0], t, getattr(status, "_flags", 0))
        except Exception:  # noqa: BLE001 - an exception would abort the stream
            self.callback_errors += 1

    def _out_cb(self, outdata, frames, time_info, status) -> None:
        self._hb_out += 1
        try:
            t = time_info.outputBufferDacTime or time_info.currentTime
            self._on_output(outdata[:, 0], t, getattr(status, "_flags", 0))
        except Exception:  # noqa: BLE001
            self.callback_errors += 1
            outdata.fill(0)

    def _duplex_cb(self, indata, outdata, frames, time_info, status) -> None:
        self._hb_in += 1
        self._hb_out += 1
        flags = getattr(status, "_flags", 0)
        try:
            self._on_input(indata[:, 0], time_info.inputBufferAdcTime or time_info.currentTime, flags)
            self._on_output(outdata[:, 0], time_info.outputBufferDacTime or time_info.currentTime, flags & ~3)
        except Exception:  # noqa: BLE001
            self.callback_errors += 1
            outdata.fill(0)

    # ------------------------------------------------------------------ opening
    def _open_guarded(self) -> bool:
        self._attempt += 1
        attempt = self._attempt
        done, _, err = _call_with_timeout(lambda: self._open_streams(attempt), self.open_timeout_s, "open")
        if not done:
            self._attempt += 1  # the late opener, if it ever finishes, closes what it opened
            self._set_state(BackendState.REFUSED, f"opening the audio device did not finish within {self.open_timeout_s:.0f} s")
            return False
        if err is None:
            return True
        if isinstance(err, _NoDevice):
            self._set_state(BackendState.NO_DEVICE, str(err))
        elif isinstance(err, _Refused):
            self._set_state(BackendState.REFUSED, str(err))
        else:
            self._set_state(BackendState.REFUSED, f"the audio device could not be opened ({err})")
        self._teardown()
        return False

    def _pick_rate(self, device, kind: str, info) -> int:
        sd = self._sd
        check = sd.check_input_settings if kind == "input" else sd.check_output_settings
        try:
            check(device=device, channels=1, dtype="float32", samplerate=self.samplerate)
            return self.samplerate
        except Exception:  # noqa: BLE001
            pass
        native = int(round(info["default_samplerate"]))
        try:
            check(device=device, channels=1, dtype="float32", samplerate=native)
        except Exception as e:  # noqa: BLE001
            raise _Refused(f"the {kind} device '{info['name']}' refused both {self.samplerate} Hz and {native} Hz mono float32 ({e})") from None
        return native

    def _open_streams(self, attempt: int) -> None:
        sd = self._sd
        try:
            devs = sd.query_devices()
        except Exception as e:  # noqa: BLE001
            raise _NoDevice(f"no audio device could be listed ({e})") from None
        if len(devs) == 0:
            hint = " (is PulseAudio or PipeWire running?)" if sys.platform.startswith("linux") else ""
            raise _NoDevice(f"no audio device was found{hint}; connect one, or use --input and "
                            "--output WAV files instead")
        try:
            info_in = sd.query_devices(self.input_device, "input")
        except Exception:  # noqa: BLE001
            what = f"'{self.input_device}'" if self.input_device is not None else "default"
            raise _NoDevice(f"no {what} input device (microphone) was found") from None
        try:
            info_out = sd.query_devices(self.output_device, "output")
        except Exception:  # noqa: BLE001
            what = f"'{self.output_device}'" if self.output_device is not None else "default"
            raise _NoDevice(f"no {what} output device (speaker) was found") from None
        in_dev, out_dev = info_in["index"], info_out["index"]
        rate_in = self._pick_rate(in_dev, "input", info_in)
        rate_out = self._pick_rate(out_dev, "output", info_out)

        def block_for(rate: int) -> int:
            if self.blocksize_request is not None:
                return int(self.blocksize_request)
            return 0 if sys.platform == "darwin" else rate // 100

        try:
            if self.duplex:
                rate = rate_in if rate_in == rate_out else self._pick_rate(out_dev, "output", info_out)
                st = sd.Stream(
                    device=(in_dev, out_dev), samplerate=rate, blocksize=block_for(rate), channels=1,
                    dtype="float32", latency=self.latency, callback=self._duplex_cb,
                )
                streams = [st]
                rate_in = rate_out = rate
                lat_in, lat_out = st.latency
            else:
                out_st = sd.OutputStream(
                    device=out_dev, samplerate=rate_out, blocksize=block_for(rate_out), channels=1,
                    dtype="float32", latency=self.latency, callback=self._out_cb,
                )
                in_st = sd.InputStream(
                    device=in_dev, samplerate=rate_in, blocksize=block_for(rate_in), channels=1,
                    dtype="float32", latency=self.latency, callback=self._in_cb,
                )
                streams = [out_st, in_st]
                lat_in, lat_out = in_st.latency, out_st.latency
        except Exception as e:  # noqa: BLE001
            raise _Refused(f"the audio device refused to open ({e})") from None
        if attempt != self._attempt:  # abandoned (timed out): never run two streams into one ring
            for st in streams:
                try:
                    st.close(ignore_errors=True)
                except Exception:  # noqa: BLE001
                    pass
            return
        self._streams = streams
        try:
            for st in streams:
                st.start()
        except Exception as e:  # noqa: BLE001
            raise _Refused(f"the audio device refused to start ({e})") from None
        self.input_rate, self.output_rate = int(rate_in), int(rate_out)
        self.resampled = rate_in != self.samplerate or rate_out != self.samplerate
        self.blocksize = block_for(rate_in)
        self.input_latency_s, self.output_latency_s = float(lat_in), float(lat_out)
        self.input_device_name = info_in["name"]
        self.output_device_name = info_out["name"]
        self._set_state(BackendState.RUNNING, "")

    def _teardown(self) -> None:
        streams, self._streams = self._streams, []
        if not streams:
            return

        def close_all():
            for st in streams:
                try:
                    st.abort(ignore_errors=True)
                except Exception:  # noqa: BLE001
                    pass
                try:
                    st.close(ignore_errors=True)
                except Exception:  # noqa: BLE001
                    pass

        done, _, _ = _call_with_timeout(close_all, self.close_timeout_s, "close")
        if not done:
            self.hung_closes += 1
            self._zombie = True  # never re-initialise PortAudio under a hung stream

    def _reinit_portaudio(self) -> bool:
        if self._zombie or self._sd is None:
            return False
        sd = self._sd

        def reinit():
            sd._terminate()  # PortAudio lists devices only at initialisation
            sd._initialize()

        done, _, err = _call_with_timeout(reinit, 2.0, "reinit")
        if not done:
            self._zombie = True
        return done and err is None

    # ------------------------------------------------------------------ watchdog and recovery
    def _supervise(self) -> None:
        last_in, last_out = self._hb_in, self._hb_out
        t_in = t_out = time.monotonic()
        next_try = 0.0
        attempts = 0
        gen_seen = self.generation
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if self.generation != gen_seen:  # reopened: fresh heartbeat baselines
                gen_seen = self.generation
                last_in, last_out = self._hb_in, self._hb_out
                t_in = t_out = now
            if self.state is BackendState.RUNNING:
                if self._hb_in != last_in:
                    last_in, t_in = self._hb_in, now
                if self._hb_out != last_out:
                    last_out, t_out = self._hb_out, now
                silent_for = now - min(t_in, t_out)
                if silent_for >= self.watchdog_s:
                    self.watchdog_fires += 1
                    self._set_state(
                        BackendState.LOST,
                        f"the audio device stopped responding (no callbacks for {silent_for * 1000:.0f} ms); reopening",
                    )
                    with self._lock:
                        self._teardown()
                    next_try = now + self.reopen_interval_s
                    attempts = 0
            elif self.state is BackendState.LOST and self.recover and now >= next_try:
                attempts += 1
                self.reopen_attempts += 1
                with self._lock:
                    if self._stop.is_set():
                        break
                    self._reinit_portaudio()
                    ok = self._open_guarded()
                if ok:
                    self.generation += 1
                    self.restarts += 1
                    self.message = "the audio device was reopened"
                else:
                    reason = self.message
                    self._set_state(BackendState.LOST, f"audio device lost; retrying ({reason})")
                    next_try = time.monotonic() + min(5.0, self.reopen_interval_s * attempts)

    def stats(self) -> dict:
        d = super().stats()
        d.update(
            portaudio_version=self.portaudio_version,
            resampled=self.resampled,
            callback_errors=self.callback_errors,
            hung_closes=self.hung_closes,
            reopen_attempts=self.reopen_attempts,
            heartbeat_in=self._hb_in,
            heartbeat_out=self._hb_out,
        )
        return d
