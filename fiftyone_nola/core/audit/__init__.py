"""Random audits of predicted labels: sampling designs, accuracy estimates with valid intervals,
and a certified confidence threshold. Pure numpy/scipy; no FiftyOne."""
