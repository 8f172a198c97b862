"""Dashboard themes: `parley-dark`, `parley-light` and `parley-ansi`.

Each is a `textual.theme.Theme`. Besides Textual's base colours they set the variables the
dashboard's CSS uses (`$meter-low`, `$meter-mid`, `$meter-high`, `$lane-you`, `$lane-model`,
`$state-*`), so a theme decides how the meters and the state word look.

`parley-ansi` is built only from the 16 ANSI colour names. The terminal draws them from its own
palette, so it looks right in 256-colour terminals, over SSH without COLORTERM and inside tmux.
"""

from __future__ import annotations

from textual.theme import Theme

_DARK_VARS = {
    "meter-low": "#4EBF71",
    "meter-mid": "#E5C07B",
    "meter-high": "#E06C75",
    "meter-track": "#3A3F4B",
    "meter-hold": "#E6E6E6",
    "lane-you": "#56B6C2",
    "lane-model": "#C678DD",
    "state-live": "#4EBF71",
    "state-speaking": "#61AFEF",
    "state-busy": "#E5C07B",
    "state-bad": "#E06C75",
    "state-idle": "#7F848E",
    "footer-key-foreground": "#61AFEF",
}

_LIGHT_VARS = {
    "meter-low": "#2E8B57",
    "meter-mid": "#B8860B",
    "meter-high": "#C0392B",
    "meter-track": "#C8C8C8",
    "meter-hold": "#202020",
    "lane-you": "#00788A",
    "lane-model": "#8E44AD",
    "state-live": "#2E8B57",
    "state-speaking": "#1F5FA8",
    "state-busy": "#B8860B",
    "state-bad": "#C0392B",
    "state-idle": "#6A6A6A",
    "footer-key-foreground": "#1F5FA8",
}

_ANSI_VARS = {
    "meter-low": "ansi_green",
    "meter-mid": "ansi_yellow",
    "meter-high": "ansi_red",
    "meter-track": "ansi_bright_black",
    "meter-hold": "ansi_bright_white",
    "lane-you": "ansi_cyan",
    "lane-model": "ansi_magenta",
    "state-live": "ansi_green",
    "state-speaking": "ansi_blue",
    "state-busy": "ansi_yellow",
    "state-bad": "ansi_red",
    "state-idle": "ansi_bright_black",
    "footer-key-foreground": "ansi_bright_blue",
    "footer-description-foreground": "ansi_default",
    "footer-background": "ansi_default",
    "footer-key-background": "ansi_default",
    "ansi-background": "ansi_black",
    "ansi-foreground": "ansi_white",
    "border-blurred": "ansi_bright_black",
    "border": "ansi_blue",
    "block-cursor-foreground": "ansi_black",
    "block-cursor-background": "ansi_white",
    "block-cursor-blurred-foreground": "ansi_default",
    "block-cursor-blurred-background": "ansi_bright_black",
    "input-cursor-background": "ansi_black",
    "input-cursor-foreground": "ansi_bright_white",
    "input-cursor-text-style": "none",
    "input-selection-background": "ansi_bright_blue",
    "screen-selection-background": "ansi_bright_blue",
    "scrollbar": "ansi_bright_black",
    "scrollbar-hover": "ansi_white",
    "scrollbar-active": "ansi_bright_white",
    "scrollbar-background": "ansi_default",
    "scrollbar-background-hover": "ansi_default",
    "scrollbar-background-active": "ansi_default",
    "scrollbar-corner-color": "ansi_default",
    "link-background": "initial",
    "link-background-hover": "ansi_blue",
    "link-color": "ansi_default",
    "link-style": "underline",
    "link-color-hover": "ansi_default",
    "link-style-hover": "bold not underline",
    "markdown-h1-color": "ansi_blue",
    "button-foreground": "ansi_default",
    "button-color-foreground": "ansi_default",
    "surface-active": "ansi_default",
}

PARLEY_DARK = Theme(
    name="parley-dark",
    primary="#61AFEF",
    secondary="#56B6C2",
    accent="#C678DD",
    warning="#E5C07B",
    error="#E06C75",
    success="#4EBF71",
    foreground="#DCDFE4",
    background="#1B1E24",
    surface="#22262E",
    panel="#2C313A",
    dark=True,
    variables=_DARK_VARS,
)

PARLEY_LIGHT = Theme(
    name="parley-light",
    primary="#1F5FA8",
    secondary="#00788A",
    accent="#8E44AD",
    warning="#B8860B",
    error="#C0392B",
    success="#2E8B57",
    foreground="#1E1E1E",
    background="#F5F5F2",
    surface="#EBEBE6",
    panel="#DCDCD6",
    dark=False,
    variables=_LIGHT_VARS,
)

PARLEY_ANSI = Theme(
    name="parley-ansi",
    ansi=True,
    primary="ansi_blue",
    secondary="ansi_cyan",
    accent="ansi_magenta",
    warning="ansi_yellow",
    error="ansi_red",
    success="ansi_green",
    foreground="ansi_default",
    background="ansi_default",
    surface="ansi_default",
    panel="ansi_default",
    boost="ansi_default",
    dark=True,
    variables=_ANSI_VARS,
)

THEMES: dict[str, Theme] = {t.name: t for t in (PARLEY_DARK, PARLEY_LIGHT, PARLEY_ANSI)}

#: Short names accepted by `--theme`.
ALIASES = {"dark": "parley-dark", "light": "parley-light", "ansi": "parley-ansi"}

DEFAULT_THEME = "parley-dark"

#: Variables every dashboard theme must define (others, e.g. Textual built-ins, get these).
DASHBOARD_VARIABLES = tuple(_DARK_VARS)


def theme_name(name: str | None, *, low_colour: bool = False) -> str:
    """The registered theme name for a `--theme` value (None: dark, or ansi on low-colour links).

    Unknown names are returned unchanged so that Textual's own themes (nord, gruvbox, ...) work too.
    """
    if not name:
        return "parley-ansi" if low_colour else DEFAULT_THEME
    return ALIASES.get(name.lower(), name)


def fallback_variables(dark: bool) -> dict[str, str]:
    """Dashboard variables for a theme that does not define them (a Textual built-in theme)."""
    return dict(_DARK_VARS if dark else _LIGHT_VARS)
