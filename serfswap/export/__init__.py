"""torch -> ONNX: the export pipeline with its verification against torch, and the decoder task
(``text-generation-with-past``). The ONNX ops themselves (decompositions, graph checks) are
:mod:`serfswap.onnx_ops`; running the files is :mod:`serfswap.runtime`; the input and output
names they share are :mod:`serfswap.names`.

One module per job: :mod:`.pipeline` (``export_onnx``: each exporter's shape plans in turn until
one exports and verifies), :mod:`.request` (the checks and decisions before any file is
touched), :mod:`.writers` (the dynamo and TorchScript exporters), :mod:`.verification`
(``verify_onnx`` and the scale-aware comparison), :mod:`.naming` (input, output and axis
names), :mod:`.switches` (config switches for the export's duration), :mod:`.failures` (error
text in one line), :mod:`.report` (``ExportReport``), :mod:`.decoder` (the KV-cache task),
:mod:`.seq2seq` and :mod:`.seq2seq_parts` (encoder-decoders as Optimum's folder of three
files).
"""

from .pipeline import export_onnx
from .report import ExportReport
from .verification import Verification, verify_onnx

__all__ = ["ExportReport", "Verification", "export_onnx", "verify_onnx"]
