"""ARMS result codes (§10) and how the SA reacts to the codes it receives (§10.2).

The reaction table is what keeps armsproxy honest: a code we choose ourselves (RS down, bad
input) must never make a device reboot or re-pull; only the RS may decide that.
"""

from __future__ import annotations

from enum import Enum

# Labels exactly as libarms writes them (typos included).
LABELS: dict[int, str] = {
    100: "Success",
    102: "Command Execute Error",
    201: "Invalid XML",
    202: "Invalid Message type",
    203: "Invalid Parameter",
    301: "Server Busy",
    302: "SA Busy",
    303: "Module syncing",
    400: "Bad Request",
    401: "Server Failure",
    402: "SA Failure",
    403: "Authentication Falure",
    404: "SA Marked as stand-by",
    405: "Not found",
    406: "Too many Transaction",
    407: "Too many Status",
    408: "Invalid Storage",
    409: "Invalid Module ID",
    410: "Validation Failure",
    411: "Commit Failure",
    412: "Transction Failure",
    413: "Resource Exhausted",
    414: "SA Rollbacked",
    415: "System Error",
    416: "System Mismatch",
    417: "Invalid Hardware",
    418: "Invalid Firmware",
    419: "Module Sync needed",
    420: "Distribution ID not found",
    421: "Configuration not found",
    422: "Multiple Request",
    423: "Distribution ID Mismatch",
    501: "Out of Service",
    502: "Push Failed",
    503: "Need Reboot",
    504: "Addresss Mismatch",
    505: "Not Support",
    506: "Server Moved",
    507: "Invalid type",
    508: "Rollback Failure",
}

SUCCESS = 100
COMMAND_EXECUTE_ERROR = 102
INVALID_XML = 201
INVALID_MESSAGE_TYPE = 202
INVALID_PARAMETER = 203
SERVER_BUSY = 301
SA_BUSY = 302
MODULE_SYNCING = 303
SA_FAILURE = 402
TOO_MANY_TRANSACTIONS = 406
SA_ROLLBACKED = 414
DISTID_MISMATCH = 423
PUSH_FAILED = 502
NOT_SUPPORT = 505
ROLLBACK_FAILURE = 508


def label(code: int) -> str:
    return LABELS.get(code, "Unknown result")


def is_success(code: int) -> bool:
    return 100 <= code <= 199


class Reaction(str, Enum):
    """What the SA does after receiving a code (§10.2)."""

    SUCCESS = "success"
    RETRY = "retry"  # next URL, then wait rs-retry-interval and try again
    DROP_SERVER = "drop-server"  # https-simple confirmation: this server is skipped
    FINISHED = "finished"  # done accepted, transaction ends
    REPULL = "re-pull"
    REBOOT = "reboot"
    STOP = "stop"
    ROLLBACK = "rollback"  # configure-done
    RESEND = "resend"  # configure-done after rollback


def sa_reaction(message: str, code: int) -> Reaction:
    """The SA's reaction to ``code`` in the answer to ``message`` (its base type).

    ``message`` is one of rs-solicitation, config-solicitation, push-method-query,
    push-confirmation-start, configure-done, or any other ``*-done``.
    """
    if code == 501:
        return Reaction.STOP
    if message in ("rs-solicitation", "config-solicitation"):
        if 100 <= code <= 199:
            return Reaction.SUCCESS
        if 200 <= code <= 299:
            return Reaction.REBOOT
        if code == 502:
            return Reaction.REPULL
        if code >= 500:
            return Reaction.REBOOT
        return Reaction.RETRY
    if message == "push-method-query":
        if code < 200:
            return Reaction.SUCCESS
        if 200 <= code <= 299 or code in (502, 507, 508):
            return Reaction.REPULL
        if 300 <= code <= 499:
            return Reaction.RETRY
        return Reaction.REBOOT
    if message == "push-confirmation-start":
        if code < 200:
            return Reaction.SUCCESS
        if 300 <= code <= 499:
            return Reaction.DROP_SERVER
        if 200 <= code <= 299 or code in (502, 507, 508):
            return Reaction.REPULL
        return Reaction.REBOOT
    if message == "configure-done":
        if 100 <= code <= 199:
            return Reaction.SUCCESS
        if code < 100 or 200 <= code <= 499:
            return Reaction.ROLLBACK
        if code in (502, 508):
            return Reaction.REPULL
        return Reaction.REBOOT
    # generic *-done
    if code < 200 or 300 <= code <= 499:
        return Reaction.FINISHED if code >= 300 else Reaction.SUCCESS
    if 200 <= code <= 299 or code in (502, 508):
        return Reaction.REPULL
    return Reaction.REBOOT


#: Reactions a code chosen by armsproxy itself (not by the RS) may cause.
SAFE_REACTIONS = frozenset({Reaction.SUCCESS, Reaction.RETRY, Reaction.DROP_SERVER})
