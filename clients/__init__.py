"""alignd's clients: the Python SDK (``from alignd.clients import Client, AsyncClient, AligndError``), the terminal
chat (``alignd chat``, :mod:`alignd.clients.terminal`), simulated users (``alignd simulate``,
:mod:`alignd.clients.simulate`) and the web chat page (``clients/web/``)."""

from alignd.clients.sdk import (
    AligndError,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnavailableError,
    UnprocessableEntityError,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AligndError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnavailableError",
    "UnprocessableEntityError",
]
