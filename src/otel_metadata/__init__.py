"""otel-metadata: OpenTelemetry span context → PromptLayer request metadata.

    provider.add_span_processor(MetadataSpanProcessor())   # reads PROMPTLAYER_API_KEY
"""

from .context import metadata_context, set_request_id
from .processor import MetadataSpanProcessor
from .retry import RetryPolicy
from .sampler import MetadataSampler

__all__ = [
    "MetadataSampler", "MetadataSpanProcessor", "RetryPolicy", "metadata_context", "set_request_id",
]
__version__ = "0.1.0"
