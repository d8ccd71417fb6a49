"""Stage 3: the XGBoost stage compiled to native code, and TreeSHAP for reasons.

`base` (interface, xgboost reference path, explainers), `native` (our generated C layout and
exact TreeSHAP; its C lives in `native_runtime.c`), `tl2cgen` (Treelite -> TL2cgen compiler and
its ctypes stage), `paths` (GTIL, TL2cgen Predictor and ONNX Runtime paths), `router` (routing by
batch size), `cache` (the compiled-library cache), `build` (the factory the pipeline calls).
May import bundle, config and errors; never the pipeline, serving or CLI.
"""
