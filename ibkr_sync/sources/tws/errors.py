"""IB error codes and what they mean for a read; their translation into our exceptions.

Which codes end a read, which spoil only the values of the account being read, and
which are only logged is decided here and nowhere else. The messages name the address
and what to check, so that the one line the command prints is enough to act on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayUnavailable,
    NotAGateway,
)

if TYPE_CHECKING:
    from ...conf import GatewayConfig
    from .state import _ReadState

# The name the source logs under, as it always has: hosts configure it, and the client
# library's records are re-logged under it.
LOGGER_NAME = "ibkr_sync.gateway"
logger = logging.getLogger(LOGGER_NAME)

# IB error codes that end a read, decided here and nowhere else. Everything else the
# gateway says during a read is informational and only logged: the data farms' status
# (2104/2106/2158 OK, 2107/2108 inactive, 2119 connecting, and 2103/2105/2157 one farm's
# link broken: market, historical and contract data, not the account server the
# positions and values come from; TWS sends them routinely, at every connect), and 1102
# "connectivity restored, data maintained".
# 1100 and 2110 both mean TWS / Gateway has lost its link to IBKR's servers, and 1101
# that it is back but every request in flight was dropped ("data lost"; the client
# library's own watchdog restarts on 1100): what it reported around them may be stale or
# partial. Before the positions' end they fail the read and nothing is written (no
# position is closed because of an outage); after it, like every failure of the session,
# they spoil each account whose values had not ended before them on the wire. A 1101 or
# 1102 after them spoils nothing back. The next sync after it recovers reads afresh.
_CLIENT_ID_IN_USE = 326
_GATEWAY_DOWN_CODES = frozenset({502, 504, 1300})
_SERVER_LINK_DOWN_CODES = frozenset({1100, 1101, 2110})
_REQUEST_FAILED_CODES = frozenset({321, 322})
# A read's own requests (positions, account updates) carry no request id: TWS answers
# them with this one. A request error with the id of a request concerns that request,
# never one of the read's (another of the client's), and is only logged.
_NO_REQUEST_ID = -1
# The account-updates subscription was taken over (2100: TWS serves one account at a
# time) or refused because another client holds one for a different account (2101): the
# values of the account being read are then incomplete, its positions are not affected.
_ACCOUNT_DATA_UNSUBSCRIBED = 2100
_ACCOUNT_DATA_REFUSED = 2101
_ACCOUNT_DATA_CODES = {
    _ACCOUNT_DATA_UNSUBSCRIBED: ("ended", "warning", "another request took it over"),
    _ACCOUNT_DATA_REFUSED: ("refused", "error", "another client holds it for a different account"),
}


def _where(config: GatewayConfig, what: str) -> str:
    """Where `what` (host, port, client id) of the gateway a sync reads is set: the
    connection's, or the settings' (`IBKR_PORT`)."""
    if config.name:
        return f"connection {config.name}'s {what}"
    return "IBKR_" + what.upper().replace(" ", "_")


def _setup_checklist(config: GatewayConfig) -> str:
    return (
        "Check that TWS or IB Gateway is running and logged in, that 'Enable ActiveX and "
        "Socket Clients' is checked in its API settings, that the API port matches "
        f"{_where(config, 'port')}, and that this machine's IP address is in its trusted "
        "IPs."
    )


def _port_checklist(config: GatewayConfig) -> str:
    names = (
        f"connection {config.name}'s host and port" if config.name else "IBKR_HOST and IBKR_PORT"
    )
    return (
        f"Check that {names} name the API port of TWS / IB Gateway (its API "
        "settings' 'Socket port'; by default 7496 live / 7497 paper for TWS, 4001 / 4002 "
        "for IB Gateway)."
    )


class TwsErrors:
    """The source's handling of what the gateway reports as errors, for the read in
    `state`: the session's failure, or the spoiling of one account's values."""

    config: GatewayConfig
    address: str

    def _on_error(self, state: _ReadState, req_id: int, code: int, text: str, *_: Any) -> None:
        if code == _CLIENT_ID_IN_USE:
            state.fail(
                ClientIdInUse(
                    f"The IB gateway at {self.address} refused client id "
                    f"{self.config.client_id}: it is already in use by another API "
                    f"connection. Set {_where(self.config, 'client id')} to a client id no other "
                    "tool uses.",
                    ib_code=code,
                )
            )
        elif code in _GATEWAY_DOWN_CODES:
            state.fail(
                GatewayUnavailable(
                    f"The IB gateway at {self.address} reported error {code}: {_cut(text)}. "
                    + _setup_checklist(self.config),
                    ib_code=code,
                )
            )
        elif code in _SERVER_LINK_DOWN_CODES:
            state.fail(
                GatewayUnavailable(
                    f"The IB gateway at {self.address} lost its connection to IBKR's servers "
                    f"during the read (error {code}: {_cut(text)}); nothing was changed. It "
                    "reconnects by itself: try again in a few minutes.",
                    ib_code=code,
                )
            )
        elif code in _ACCOUNT_DATA_CODES:
            logger.warning("IB gateway message %s (reqId %s): %s", code, req_id, _cut(text))
            read = state.values
            # TWS answers in order: a 2100 before any of this account's values ends the
            # subscription just cancelled (some versions confirm a cancel so), not this one.
            if read is not None and (
                code == _ACCOUNT_DATA_REFUSED
                or read.values
                or read.positions
                or not read.after_cancel
            ):
                what, kind, why = _ACCOUNT_DATA_CODES[code]
                read.spoil(
                    f"IBKR {what} the subscription to the account's values ({kind} {code}: "
                    f"{_cut(text)}). TWS serves one account's values at a time to all its API "
                    f"clients: {why}; its stored values were kept"
                )
        elif code in _REQUEST_FAILED_CODES and req_id != _NO_REQUEST_ID:
            logger.info("IB gateway message %s (reqId %s): %s", code, req_id, _cut(text))
        elif code in _REQUEST_FAILED_CODES and state.values is not None:
            # The account-updates request of one account: its values, not the session.
            state.values.spoil(
                f"IBKR rejected the request for the account's values (error {code}: "
                f"{_cut(text)}); its stored values were kept"
            )
        elif code in _REQUEST_FAILED_CODES:
            state.fail(
                GatewayError(
                    f"The IB gateway at {self.address} rejected a request "
                    f"(error {code}: {_cut(text)}); nothing was changed.",
                    ib_code=code,
                )
            )
        else:
            logger.info("IB gateway message %s (reqId %s): %s", code, req_id, _cut(text))

    def _on_api_error(self, state: _ReadState, message: str) -> None:
        state.fail(
            GatewayUnavailable(
                f"The IB gateway at {self.address} closed the API connection ({message}). "
                + _setup_checklist(self.config)
            )
        )

    def _on_socket_closed(self, state: _ReadState, message: str) -> None:
        state.fail(
            GatewayUnavailable(
                f"The IB gateway at {self.address} closed the connection"
                f"{f' ({message})' if message else ''} before the read finished; nothing "
                "was changed. " + _setup_checklist(self.config)
            )
        )

    def _not_a_gateway(self, what: str, *, closed: bool = False) -> GatewayUnavailable:
        """What answered is not TWS (`not_a_gateway`); or, for a peer that closed without a
        word, a gateway refusing this client as likely as another service, so it stays
        `gateway_unavailable`, saying both."""
        if closed:
            return GatewayUnavailable(
                f"{self.address} accepted the connection, but {what}; nothing was changed. "
                "TWS / IB Gateway does so to a client it refuses: check that this machine's "
                "IP address is in its trusted IPs (and 'Allow connections from localhost "
                "only' off for another machine), and that a proxy in front of it (a "
                "container's published port) has it running behind. Or something other "
                "than TWS listens there: " + _port_checklist(self.config)
            )
        return NotAGateway(
            f"{self.address} answered, but not as TWS / IB Gateway: {what}; nothing was "
            "changed. " + _port_checklist(self.config)
        )


def _cut(text: str, limit: int = 300) -> str:
    """A gateway's text as a message quotes it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _shown_bytes(data: bytes, limit: int = 40) -> str:
    """Bytes a peer sent, as a message quotes them: the first `limit`, printable."""
    return repr(data[:limit])[1:] + ("..." if len(data) > limit else "")
