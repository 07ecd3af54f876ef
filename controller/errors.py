"""The errors a request or an operator's command can meet in the controller, and the one
table that says how each is answered: its gRPC status and its HTTP status and type."""
from __future__ import annotations

from dataclasses import dataclass


class ControlError(ValueError):
    """An error with one sentence for the caller; `code` is an OpenAI-style error code."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class NoDeployment(ControlError):
    """No deployment is active (or it was removed while the request ran)."""


class BadRequest(ControlError):
    """A request that cannot be served as asked (the caller must change it)."""


class Busy(ControlError):
    """Every KV-cache slot is taken and the waiting queue is full (retry later)."""


class Refused(ControlError):
    """An operator's command that cannot be carried out as asked (plan, deploy, drain, ...)."""


class FleetFailed(ControlError):
    """The fleet failed a request and could not recover (retry it)."""


@dataclass(frozen=True)
class Answer:
    grpc: str          # grpc.StatusCode name
    http: int          # HTTP status
    type: str          # OpenAI error type
    code: str          # OpenAI error code when the error carries none


ANSWERS: dict[type, Answer] = {
    BadRequest: Answer("INVALID_ARGUMENT", 400, "invalid_request_error", ""),
    Busy: Answer("RESOURCE_EXHAUSTED", 429, "server_overloaded", "fleet_queue_full"),
    NoDeployment: Answer("FAILED_PRECONDITION", 503, "service_unavailable", "no_deployment"),
    Refused: Answer("FAILED_PRECONDITION", 409, "invalid_request_error", "refused"),
    FleetFailed: Answer("UNAVAILABLE", 503, "service_unavailable", "fleet_unavailable"),
}


def answer(exc: ControlError) -> Answer:
    """How to answer an error of the table (a subclass answers as its nearest listed base)."""
    for cls in type(exc).__mro__:
        if cls in ANSWERS:
            return ANSWERS[cls]
    raise KeyError(f"{type(exc).__name__} has no answer in controller/errors.ANSWERS")
