"""torch -> ONNX: the export pipeline with its verification against torch, the decoder task
(``text-generation-with-past``) and the seq2seq tasks (``text2text-generation-with-past``,
``automatic-speech-recognition-with-past``: :mod:`.seq2seq`). The ONNX ops themselves
(decompositions, graph checks) are :mod:`serfswap.onnx_ops`; running the files is
:mod:`serfswap.runtime`."""

from .pipeline import ExportReport, Verification, export_onnx, verify_onnx

__all__ = ["ExportReport", "Verification", "export_onnx", "verify_onnx"]
