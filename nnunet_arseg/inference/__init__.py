"""Prediction with N samples: ``nnUNetv2_arseg_predict`` (stock predictor + sample count + extra outputs)."""
