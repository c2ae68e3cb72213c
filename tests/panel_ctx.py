"""A real FiftyOne ExecutionContext for a panel event, as the App sends it, recording the App
operations the event triggers. Shared by the panel tests and benchmarks/review_scale.py."""

from __future__ import annotations


class PanelCtx:
    """One panel event: ``PanelCtx(dataset, state=..., **params).ctx`` goes to a panel callback."""

    def __init__(
        self,
        dataset,
        state=None,
        selected=None,
        current_sample=None,
        view=None,
        panel_id="test-panel",
        extended_selection=None,
        active_fields=None,
        **params,
    ):
        from fiftyone.operators.executor import ExecutionContext, Executor

        self.executor = Executor()
        req = {
            "dataset_name": dataset.name,
            "selected": selected or [],
            "extended_selection": extended_selection,
            "params": {"panel_id": panel_id, "panel_state": state if state is not None else {}, **params},
        }
        if current_sample:
            req["current_sample"] = current_sample
        if active_fields is not None:
            req["active_fields"] = list(active_fields)
        if view is not None:
            from fiftyone.operators.operations import _serialize_view

            req["view"] = _serialize_view(view)
        self.ctx = ExecutionContext(request_params=req, executor=self.executor)

    @property
    def state(self):
        return self.ctx.panel_state

    def ops(self):
        return [
            (r["operator_uri"] if "operator_uri" in r else r.get("operator"), r.get("params"))
            for r in self.executor.to_json()["requests"]
        ]

    def op_names(self):
        return [n for n, _ in self.ops()]
