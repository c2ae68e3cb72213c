"""One-click review in the sample view: the sample's label per stage, its neighbours' labels,
and one click to accept or pick a class, which opens the next sample of the review queue.
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.stages import audit
from fiftyone_nola.stages import review as rv

from . import _common
from ._panel_common import Serialized, field_of, media_url

REVIEW_PANEL = "nola_sample_review"
NB_SHOWN = 6


class NolaSampleReview(Serialized, foo.Panel):
    """In the sample view: the sample's labels per stage, its neighbours' labels, and one click
    to accept or pick a class, which moves on to the next sample of the review queue."""

    @property
    def config(self):
        return foo.PanelConfig(
            name=REVIEW_PANEL,
            label="NoLA sample review",
            icon="rate_review",
            surfaces="modal",
            help_markdown="One click per sample: accept the label or pick the right class; "
            "the next sample of the review queue opens.",
        )

    def on_load(self, ctx):
        self.show(ctx)

    def on_change_current_sample(self, ctx):
        # A decision opens the next sample with its card already computed: the App's event for
        # that opening would compute and send the same card again, holding this (serialized)
        # panel while the reviewer's next click waits.
        card = ctx.panel.get_state("card") or {}
        if ctx.current_sample and card.get("id") == ctx.current_sample:
            return
        self.show(ctx)

    def show(self, ctx, sample_id=None):
        sid = sample_id or ctx.current_sample
        if not sid or ctx.dataset is None:
            ctx.panel.set_state("card", None)
            return
        card = rv.sample_card(ctx.dataset, sid, field_of(ctx))
        nbs = {
            f"nb_col_{j}": {f"nb_img_{j}": media_url(n["filepath"])}
            for j, n in enumerate(card["neighbours"][:NB_SHOWN])
        }
        auditing = audit.AUDIT_TAG in card["tags"]
        ctx.panel.set_state(
            {
                "card": card,
                "progress": audit.audit_progress(ctx.dataset) if auditing else rv.progress(ctx.dataset),
                "classes_list": rv.class_list(ctx.dataset, field_of(ctx)),
                "images": {"image": media_url(card["filepath"])},
                "neighbour_images": nbs,
            }
        )

    def _record(self, ctx, action, label=None):
        card = ctx.panel.get_state("card") or {}
        sid = card.get("id") or ctx.current_sample
        if not sid:
            return
        try:
            rv.decide(ctx.dataset, [sid], action, label, field_of(ctx))
        except NolaError as e:  # a message in the App, never a traceback
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.panel.set_state("last", {"id": sid, "action": action, "label": label})
        nxt = self._next(ctx, sid, audit.AUDIT_TAG in (card.get("tags") or []))
        if nxt is None:
            ctx.ops.notify("Review queue done", variant="success")
            self.show(ctx, sid)
            ctx.ops.reload_samples()
            return
        ctx.ops.open_sample(id=nxt)
        self.show(ctx, nxt)

    def _next(self, ctx, sid: str, auditing: bool):
        """The next sample: an audit sample is followed by the audit's next undecided sample (in
        the audit's order, which its estimates count in), any other by the review queue's."""
        if auditing:
            return next((i for i in audit.audit_queue(ctx.dataset) if i != sid), None)
        return rv.next_in_queue(ctx.dataset, after=sid)

    def on_accept(self, ctx):
        # The label shown: if a run replaced it meanwhile, the shown one is what was accepted.
        self._record(ctx, "accept", (ctx.panel.get_state("card") or {}).get("prediction"))

    def on_accept_suggestion(self, ctx):
        card = ctx.panel.get_state("card") or {}
        self._record(ctx, "correct", card.get("suggestion"))

    def on_reject(self, ctx):
        self._record(ctx, "reject")

    def on_pick(self, ctx):
        self._record(ctx, "correct", ctx.params.get("label"))

    def on_close(self, ctx):
        # The card goes with the sample: the panel keeps its state while the sample view is closed,
        # and the next "Review the queue" showed this card (another sample's label and buttons)
        # until the new one arrived (seen in Chromium at 100,000 samples: its "Accept: deer" read
        # for a sample predicted "cat").
        ctx.panel.set_state("card", None)
        ctx.ops.close_sample()
        _common.show_review_fields(ctx)

    def on_skip(self, ctx):
        card = ctx.panel.get_state("card") or {}
        nxt = self._next(ctx, card.get("id"), audit.AUDIT_TAG in (card.get("tags") or []))
        if nxt:
            ctx.ops.open_sample(id=nxt)
            self.show(ctx, nxt)

    def render(self, ctx):
        panel = types.Object()
        card = ctx.panel.get_state("card")
        if not card:
            panel.md("Open a sample to review it.", name="empty")
            return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))
        imgs = panel.h_stack("images", gap=2, align_y="top")
        imgs.view("image", types.ImageView(height="224px", alt="sample"))
        imgs.md(_card_md(card, ctx.panel.get_state("progress") or {}), name="card_md")
        if card["neighbours"]:
            nbs = panel.h_stack("neighbour_images", gap=1)
            for j, n in enumerate(card["neighbours"][:NB_SHOWN]):
                col = nbs.v_stack(f"nb_col_{j}", gap=0)
                col.view(f"nb_img_{j}", types.ImageView(height="72px", alt=n["label"] or ""))
                col.md(f"{n['label']} · {n['similarity']:.2f}", name=f"nb_txt_{j}")
        self._render_actions(ctx, panel, card)
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))

    def _render_actions(self, ctx, panel, card) -> None:
        """Accept (the suggestion or the label shown), reject, skip, back, and one button per class."""
        pred, sugg = card.get("prediction"), card.get("suggestion")
        # Named per sample: the buttons are new for every sample, so the one just clicked does not
        # keep its focus outline on the next sample (it looked pre-selected).
        key = card["id"][-8:]
        top = panel.h_stack(f"main_actions_{key}", gap=1)
        if sugg:
            top.btn(
                "accept_suggestion",
                label=f"Accept suggestion: {sugg}",
                icon="done_all",
                variant="contained",
                on_click=self.on_accept_suggestion,
            )
        top.btn(
            "accept",
            label=f"Accept: {pred}" if pred else "Accept",
            icon="check",
            variant="outlined" if sugg else "contained",
            on_click=self.on_accept,
        )
        top.btn("reject", label="Reject", icon="close", on_click=self.on_reject)
        top.btn("skip", label="Skip", icon="skip_next", on_click=self.on_skip)
        top.btn("close", label="Back to the grid", icon="grid_view", on_click=self.on_close)
        panel.md("Or pick the right class (one click, then the next sample opens):", name="pick_text")
        classes = ctx.panel.get_state("classes_list") or []
        for r in range(0, len(classes), 4):
            row = panel.h_stack(f"pick_row_{key}_{r // 4}", gap=1)
            for cls in classes[r : r + 4]:
                row.btn(
                    f"pick_{key}_{classes.index(cls)}",
                    label=cls,
                    on_click=self.on_pick,
                    params={"label": cls},
                    variant="outlined",
                )


def _card_md(card: dict, prog: dict) -> str:
    """The card's text: status and progress, each stage's label and confidence, the neighbours' title."""
    if audit.AUDIT_TAG in (card.get("tags") or []):
        status = (
            f"**Audit sample** ({card['status']}) · audited {prog.get('audited', 0)} of {prog.get('drawn', 0)}"
            f" · {prog.get('remaining', 0)} left"
        )
    else:
        status = (
            f"**Status**: {card['status']} · **queue**: {prog.get('queue', 0)} left"
            f" · reviewed {prog.get('reviewed', 0)} of {prog.get('flagged', 0)} flagged"
        )
    lines = [status, "", "| stage | label | confidence |", "|---|---|---|"]
    lines += [
        f"| {s['field']} | {s['label']} | {'-' if s['confidence'] is None else s['confidence']} |"
        for s in card["stages"]
    ]
    if card["neighbours"]:
        lines += ["", "**Nearest neighbours** (stored index) below: their labels · similarity"]
    return "\n".join(lines)
