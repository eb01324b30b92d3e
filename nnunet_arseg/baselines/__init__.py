"""Baseline networks that sample through the same predictor as AR-Seg (the ``ARSegNetwork`` eval contract)."""
