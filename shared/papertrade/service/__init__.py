"""The service skeleton every papertrade service uses: app factory, links, errors, logs, metrics."""

from papertrade.service.app import ServiceContext, create_app, run_service
from papertrade.service.errors import ApiError, ErrorCode

__all__ = ["ApiError", "ErrorCode", "ServiceContext", "create_app", "run_service"]
