"""Names vulture sees no use of, used all the same (read by `vulture`, never imported)."""

from cluster.demo import DemoSummary
from cluster.transport.connection import EmbeddedRedis
from schemas import Message, ProductView, ViewScore

# Written into summary.json by dataclasses.asdict.
DemoSummary.complete
DemoSummary.defective_truth
DemoSummary.defects_found
DemoSummary.false_alarms
# Fields of the stream messages: consumers in other languages read them (JSON Schema).
ProductView.mask_coverage
ViewScore.defect_map_ref
# Part of the schemas' API for producers: a message validated, or a SchemaError.
Message.build
# Tells a caller whether leaving the context stops the server.
EmbeddedRedis.owned
# Attributes set for other libraries, which read them: ONNX Runtime's session options, and the
# class of EfficientNet's convolutions (workers.differnet.backbone).
options.intra_op_num_threads  # noqa: F821
options.inter_op_num_threads  # noqa: F821
module.__class__  # noqa: F821
server.should_exit  # noqa: F821  (uvicorn's server reads it: the dashboard thread stops)
