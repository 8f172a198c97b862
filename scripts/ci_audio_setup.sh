#!/usr/bin/env bash
# Headless audio for CI and tests (AUDIO.md §12.2-§12.3): installs PortAudio + PulseAudio when they
# are missing, then starts a PulseAudio daemon with two null sinks:
#   vspk  the app's "speaker" (default sink)      -> record what the app played from vspk.monitor
#   vmic  the "room" the app listens to            -> the default source is vmic.monitor
# plus one keep-alive client per sink (an idle null sink sleeps and stalls the first callbacks).
#
# Idempotent: a second call with the server already up only checks it (and the keep-alives).
#
# Usage: scripts/ci_audio_setup.sh [--no-install] [--echo] [--no-echo] [--restart] [--stop] [--status]
#   --no-install  never call apt-get (fail if something is missing)
#   --echo        add the speaker->mic leakage path: module-loopback vspk.monitor -> vmic,
#                 latency 20 ms, volume 70 % (about -9.3 dB), like a laptop speaker into its mic
#   --no-echo     remove that path again
#   --restart     stop everything first, then start fresh
#   --stop        kill the keep-alives and the daemon, then exit
#   --status      print the state and exit (0 = running)
# Exit status: 0 when the server answers with both sinks; 1 otherwise (with a reason on stderr).
# Environment: PARLEY_PULSE_DIR (state directory, default /tmp/parley-pulse).
set -u

STATE_DIR="${PARLEY_PULSE_DIR:-/tmp/parley-pulse}"
INSTALL=1
ECHO=keep
ACTION=start

for arg in "$@"; do
    case "$arg" in
        --no-install) INSTALL=0 ;;
        --echo) ECHO=on ;;
        --no-echo) ECHO=off ;;
        --restart) ACTION=restart ;;
        --stop) ACTION=stop ;;
        --status) ACTION=status ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "ci_audio_setup: unknown option $arg" >&2; exit 2 ;;
    esac
done

log() { echo "ci_audio_setup: $*" >&2; }

have_pkgs() {
    command -v pulseaudio >/dev/null 2>&1 && command -v pactl >/dev/null 2>&1 \
        && command -v pacat >/dev/null 2>&1 \
        && { ldconfig -p 2>/dev/null | grep -q libportaudio.so.2; } \
        && { ls /usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so >/dev/null 2>&1; }
}

install_pkgs() {
    if have_pkgs; then return 0; fi
    if [ "$INSTALL" = 0 ]; then
        log "PulseAudio/PortAudio missing and --no-install given"; return 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "PulseAudio/PortAudio missing and no apt-get here"; return 1
    fi
    local SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
            log "need root (or sudo) to install packages"; return 1; fi
    fi
    log "installing libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins"
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins >/dev/null \
        || { log "apt-get install failed"; return 1; }
    have_pkgs || { log "packages installed but still not found"; return 1; }
}

server_up() { timeout 2 pactl info >/dev/null 2>&1; }

sinks_ok() {
    local sinks
    sinks="$(timeout 2 pactl list short sinks 2>/dev/null)" || return 1
    echo "$sinks" | grep -qw vspk && echo "$sinks" | grep -qw vmic
}

start_keepalives() {
    mkdir -p "$STATE_DIR"
    local sink pidfile pid
    for sink in vspk vmic; do
        pidfile="$STATE_DIR/keepalive-$sink.pid"
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile")"
            if kill -0 "$pid" 2>/dev/null; then continue; fi
        fi
        nohup pacat --playback -d "$sink" --latency-msec=10 --raw --format=s16le --rate=48000 \
            --channels=1 /dev/zero >/dev/null 2>&1 &
        echo $! >"$pidfile"
    done
}

stop_all() {
    local pidfile pid
    for pidfile in "$STATE_DIR"/keepalive-*.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    if command -v pulseaudio >/dev/null 2>&1; then
        timeout 5 pulseaudio --kill >/dev/null 2>&1 || true
    fi
    # wait for the socket to go away so that a restart does not find a dying server
    for _ in $(seq 1 50); do server_up || break; sleep 0.05; done
}

set_echo() {
    local ids
    ids="$(timeout 2 pactl list short modules 2>/dev/null | awk '/module-loopback/ && /vspk.monitor/ {print $1}')"
    if [ "$ECHO" = on ]; then
        if [ -z "$ids" ]; then
            local mod
            mod="$(timeout 2 pactl load-module module-loopback source=vspk.monitor sink=vmic \
                latency_msec=20 source_dont_move=true sink_dont_move=true)" \
                || { log "could not load module-loopback"; return 1; }
            # the loopback's sink input: set 70 % volume (about -9.3 dB of leakage)
            local si
            for _ in $(seq 1 40); do
                si="$(timeout 2 pactl list short sink-inputs 2>/dev/null | awk -v m="$mod" '$3 == m {print $1}')"
                [ -n "$si" ] && break
                sleep 0.05
            done
            if [ -n "$si" ]; then timeout 2 pactl set-sink-input-volume "$si" 70%; fi
        fi
    elif [ "$ECHO" = off ]; then
        for id in $ids; do timeout 2 pactl unload-module "$id" || true; done
    fi
    return 0
}

start_server() {
    mkdir -p "$STATE_DIR"
    cat >"$STATE_DIR/parley.pa" <<'EOF'
.fail
load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name=vspk format=s16le channels=1 rate=48000 sink_properties=device.description=ParleyVirtualSpeaker
load-module module-null-sink sink_name=vmic format=s16le channels=1 rate=48000 sink_properties=device.description=ParleyVirtualRoom
set-default-sink vspk
set-default-source vmic.monitor
EOF
    pulseaudio --daemonize=yes -n -F "$STATE_DIR/parley.pa" --exit-idle-time=-1 \
        --log-target="file:$STATE_DIR/pulseaudio.log" >/dev/null 2>&1 \
        || { log "pulseaudio failed to start (see $STATE_DIR/pulseaudio.log)"; return 1; }
    for _ in $(seq 1 100); do server_up && return 0; sleep 0.02; done
    log "pulseaudio started but pactl info does not answer"; return 1
}

case "$ACTION" in
    status)
        if server_up && sinks_ok; then echo "running"; exit 0; fi
        echo "not running"; exit 1 ;;
    stop)
        stop_all; exit 0 ;;
    restart)
        stop_all ;;
esac

install_pkgs || exit 1

if server_up && ! sinks_ok; then
    log "a PulseAudio server without the vspk/vmic sinks is running; restarting it"
    stop_all
fi
fresh=0
if ! server_up; then
    start_server || exit 1
    fresh=1
fi
sinks_ok || { log "sinks vspk/vmic missing after start"; exit 1; }
start_keepalives
set_echo || exit 1
# AUDIO.md §12.3 step 6: the first measurement right after a (re)start is unreliable
if [ "$fresh" = 1 ]; then sleep 0.5; fi
exit 0
