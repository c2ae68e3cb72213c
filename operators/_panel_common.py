"""What the two NoLA panels share: the field under review, the App context's targets and threshold,
media URLs, the histogram traces, the grid view, the echo filter of mirrored controls, and
one-at-a-time callbacks."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional
from urllib.parse import quote

import fiftyone.operators.types as types

from fiftyone_nola.core.names import PREDICTIONS_FIELD
from fiftyone_nola.stages import review as rv

from . import _common

PLUGIN = "@fiftyone-nola/nola"
DEFAULT_FIELD = PREDICTIONS_FIELD
MODEL_EVALUATION_PANEL = "model_evaluation_panel_builtin"  # FiftyOne's Model Evaluation panel


def media_url(filepath) -> str | None:
    """The App server's URL of a local media file."""
    return f"/media?filepath={quote(str(filepath), safe='')}" if filepath else None


def field_of(ctx) -> str:
    """The predictions field under review (the last flagging's, else ``nola``)."""
    return rv.review_field(ctx.dataset)


def model_evaluation_button(obj, name: str = "open_model_evaluation", label: str = "Open Model Evaluation"):
    """A button opening FiftyOne's Model Evaluation panel (usable in panels and operator outputs:
    it runs the App's own ``open_panel`` operator, no round trip to Python)."""
    obj.view(
        name,
        types.Button(
            label=label,
            icon="ssid_chart",
            variant="outlined",
            operator="open_panel",
            params={"name": MODEL_EVALUATION_PANEL, "layout": "horizontal", "isActive": True},
        ),
    )


def _has_predictions(ctx) -> bool:
    return ctx.dataset is not None and ctx.dataset.has_sample_field(field_of(ctx))


def _threshold(ctx) -> float:
    """The applied threshold: the last flagging's, stored on the dataset (else the default)."""
    return rv.applied_threshold(ctx.dataset)


def _targets(ctx) -> list:
    """The samples the review buttons act on: the grid selection, else a lasso in the map."""
    if ctx.selected:
        return list(ctx.selected)
    ext = ctx.extended_selection
    if isinstance(ext, dict):
        ext = ext.get("selection")
    return list(ext or [])


def _histogram_traces(h: dict) -> list:
    return [
        {
            "type": "bar",
            "name": "flagged (below threshold)",
            "x": h["centers"],
            "y": h["below"],
            "marker": {"color": "#e0562f"},
            "width": 0.045,
        },
        {
            "type": "bar",
            "name": "kept",
            "x": h["centers"],
            "y": h["above"],
            "marker": {"color": "#6c8ebf"},
            "width": 0.045,
        },
    ]


def _show(ctx, view, reload: Optional[str] = "dataset") -> None:
    """Point the grid at ``view`` and make the review fields visible there (``reload``: what the
    action wrote, as :func:`_common.show_review_fields` takes it).

    A new view is sent alone: the App loads the dataset's page for it (schema, grid, counts), so
    new fields and values show without a reload. The App is told to reload only when the view
    stays the same (a threshold move on the flagged grid). A reload beside a new view was one more
    round of the App's queries (most of a threshold move's wait at 100,000 samples), and a dataset
    reload restores the view and panel state the App server holds, which can be older than the
    ones this event sends: after *Draw for audit* the full grid and the Draw form came back (seen
    in Chromium under load, with the reload sent before or after the view)."""
    if ctx.view is not None and _stages(ctx.view) == _stages(view):
        _common.reload_app(ctx, reload)
    else:
        ctx.ops.set_view(view)
    _common.show_review_fields(ctx, reload=None)


def _stages(view) -> list:
    return view._serialize(include_uuids=False)


def _open_in_sample_view(ctx, view, sample_id) -> None:
    """The grid on ``view`` and ``sample_id`` opened in the sample view. The view is set only if
    the grid shows another, and the App's dataset is not reloaded: either lands after the sample
    has opened and closes it again (seen in Chromium: the audit's first sample opened and closed)."""
    if _stages(ctx.view) != _stages(view):
        ctx.ops.set_view(view)
    ctx.ops.open_sample(id=sample_id)


class _Echoes:
    """Values written from here into a panel's controls, per (panel, control), oldest first.

    The App sends a value set from Python back as that control's change: such an event is an
    echo, not the user's move, and re-applying it would drag the other control back (two
    mirrored controls would then ping-pong). Echoes come back in order, so one consumes the
    pushes up to it; any other value is a move and clears them.
    """

    def __init__(self):
        self._pushed: dict = {}

    def push(self, panel_id, control: str, value: float) -> None:
        self._pushed.setdefault((panel_id, control), []).append(round(value, 4))

    def is_echo(self, panel_id, control: str, value: float) -> bool:
        pushed = self._pushed.get((panel_id, control), [])
        v = round(value, 4)
        if v in pushed:
            del pushed[: pushed.index(v) + 1]
            return True
        pushed.clear()
        return False


class _Memo:
    """The panel's dataset reads, kept while :func:`rv.data_version` is unchanged.

    The App sends the panel an event on every selection change, view change and sample closing,
    and each used to read every count again: 0.2 s at 100,000 samples, holding the panel lock and
    the server's interpreter while the App's own queries for the new view waited behind it. The
    key includes the version, so any write since (a decision, a flagging, a job's labels) reads
    again."""

    def __init__(self, size: int = 16):
        self._values: OrderedDict = OrderedDict()
        self._size = size

    def get(self, key, compute):
        """The value under ``key``, computed once; a key without a version is never kept."""
        if key[0] is None:
            return compute()
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        return self.put(key, compute())

    def put(self, key, value):
        if key[0] is not None:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self._size:
                self._values.popitem(last=False)
        return value


# App events run in server threads, and loading the dataset in one event reloads the shared
# Dataset object under another's feet (a field just added vanishes from its schema): the
# panels' events run one at a time.
_PANEL_LOCK = threading.RLock()
_ECHOES = _Echoes()
_MEMO = _Memo()


class Serialized:
    """Mixin: a panel whose events run one at a time (see ``_PANEL_LOCK``)."""

    def execute(self, ctx):
        with _PANEL_LOCK:
            return super().execute(ctx)
