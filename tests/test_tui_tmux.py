"""The real `parley` command in a real terminal (tmux), as a user would drive it.

It starts `parley --model tests/fixtures/personaplex-tiny --input input.wav --output out.wav` in a
private tmux server, reads the screen with `capture-pane`, presses `m` and `q`, and checks: the
meters move, the model's text streams, the persona's name is on screen, MUTED shows after `m`, and
`q` exits with status 0. It also collects the UI frame-time probe of that run.

Skipped only when tmux is missing. `PARLEY_TUI_COMMAND` overrides the command (default `parley`),
e.g. `python -m tui.dashboard_cli`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

REPO = Path(__file__).resolve().parents[1]


class Tmux:
    def __init__(self, socket: str):
        self.socket = socket

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                             timeout=10)
        if check and out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-t", "t", "-p")

    def wait_screen(self, predicate, timeout: float, what: str) -> str:
        end = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen}")


def meter_line(screen: str, label: str) -> str:
    for line in screen.splitlines():
        if re.search(rf"[│ ]\s*{label}\s+▕", line):
            return line
    return ""


def test_parley_in_tmux(tmp_path):
    command = os.environ.get("PARLEY_TUI_COMMAND") or "parley"
    if command == "parley" and shutil.which("parley") is None:
        command = f"{shlex.quote(sys.executable)} -m tui.cli"
    out_wav = tmp_path / "out.wav"
    probe = tmp_path / "probe.json"
    status = tmp_path / "status"
    launch = (f"cd {shlex.quote(str(REPO))} && PARLEY_UI_PROBE_FILE={shlex.quote(str(probe))} "
              f"{command} --model {shlex.quote(str(TINY_DIR))} "
              f"--input {shlex.quote(str(TINY_DIR / 'input.wav'))} "
              f"--output {shlex.quote(str(out_wav))} --seed 3; "
              f"echo $? > {shlex.quote(str(status))}; sleep 60")
    tmux = Tmux(f"parley-test-{os.getpid()}")
    tmux.run("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "120", "-y", "40", launch)
    try:
        tmux.run("set-option", "-t", "t", "window-size", "manual", check=False)
        tmux.run("resize-window", "-t", "t", "-x", "120", "-y", "40", check=False)
        # on screen at once; then live with the persona's name
        first = tmux.wait_screen(lambda s: "LOADING" in s or "frame" in s, 15, "the dashboard")
        assert "Traceback" not in first
        live = tmux.wait_screen(
            lambda s: "step p50" in s and "dBFS" in s
            and re.search(r"MIC\s+▕\S*█", s) is not None, 40, "live meters")
        assert "Teacher" in live
        assert "personaplex-tiny" in live

        # the meters move and the text streams
        mic_lines = {meter_line(live, "MIC")}
        spk_lines = {meter_line(live, "SPK")}
        texts = []
        for _ in range(12):
            time.sleep(0.25)
            screen = tmux.screen()
            mic_lines.add(meter_line(screen, "MIC"))
            spk_lines.add(meter_line(screen, "SPK"))
            texts.append(screen)
        assert len(mic_lines) >= 3, f"the MIC meter did not move: {mic_lines}"
        assert len(spk_lines) >= 2, f"the SPK meter did not move: {spk_lines}"
        stamped = [re.findall(r"\d\d:\d\d:\d\d  (?!┄)(\S[^│]*?)\s*[▌│]", s) for s in texts]
        assert any(stamped), "no model text on screen"
        assert len({tuple(s) for s in stamped}) >= 2, "the model text did not stream"

        # m: MUTED
        tmux.run("send-keys", "-t", "t", "m")
        muted = tmux.wait_screen(lambda s: "MUTED" in s, 5, "MUTED after m")
        assert "MUTED" in meter_line(muted, "MIC")

        # q: exit status 0
        tmux.run("send-keys", "-t", "t", "q")
        end = time.monotonic() + 15
        while time.monotonic() < end and not status.exists():
            time.sleep(0.1)
        assert status.exists(), "parley did not exit after q:\n" + tmux.screen()
        assert status.read_text().strip() == "0"
        after = tmux.screen()
        assert "Traceback" not in after
    finally:
        tmux.run("kill-server", check=False)
    assert out_wav.exists() and out_wav.stat().st_size > 44
    if probe.exists():
        report = json.loads(probe.read_text())
        with_capsys = report.get("render_ms", {})
        print(f"\nUI frame time in tmux (120x40): {report}")
        assert with_capsys.get("n", 0) > 0
