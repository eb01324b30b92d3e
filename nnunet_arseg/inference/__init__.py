"""``nnUNetv2_arseg_predict``: input checks (``inputs``), the predictor (``predictor``), the extra outputs of a case
(``outputs``) and where they go (``files``), the command line (``predict``)."""
