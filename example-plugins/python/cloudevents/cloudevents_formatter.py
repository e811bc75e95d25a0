"""plugboard webhook formatter (WIT world `formatter` of plugboard:plugin@0.1.0)
that sends each gateway event as a CloudEvents 1.0 event in structured JSON
mode (`application/cloudevents+json`).

Config keys (all optional):
  source   the CloudEvents `source` attribute (default "plugboard")

Every failure is returned as the WIT `hook-error` (by raising
`Err(HookError_...)`): any other exception escaping an export would trap the
instance.
"""

import json
from datetime import datetime, timedelta, timezone

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.webhook_formatter import Event, OutgoingRequest
from wit_world.imports import host
from wit_world.imports.types import (
    HookError_BadConfig,
    HookError_InvalidInput,
    HookError_Other,
    LogLevel,
    Pair,
)

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
TYPE_PREFIX = "com.plugboard."
KNOWN_KEYS = ("source",)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_settings = {"source": "plugboard"}


def rfc3339(timestamp_ms: int) -> str:
    """`2025-06-02T09:14:03.512Z`: UTC with milliseconds, like the gateway."""
    seconds, millis = divmod(timestamp_ms, 1000)
    moment = EPOCH + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def to_cloudevent(event: Event, source: str) -> dict:
    try:
        data = json.loads(event.data)
    except ValueError as e:
        raise Err(HookError_InvalidInput(f"event {event.id}: data is not JSON: {e}"))
    if not isinstance(data, dict):
        raise Err(HookError_InvalidInput(f"event {event.id}: data is not a JSON object"))
    try:
        time = rfc3339(event.timestamp_ms)
    except (OverflowError, ValueError):
        raise Err(HookError_InvalidInput(f"event {event.id}: timestamp {event.timestamp_ms} ms is out of range"))

    cloudevent = {
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": TYPE_PREFIX + event.event_type,
        "time": time,
    }
    # `subject`, when present, must be a non-empty string.
    user_id = data.get("user_id")
    if isinstance(user_id, str) and user_id:
        cloudevent["subject"] = user_id
    cloudevent["datacontenttype"] = "application/json"
    cloudevent["data"] = data
    return cloudevent


def _unexpected(what: str, e: Exception) -> Err:
    return Err(HookError_Other(f"cloudevents: {what} failed: {type(e).__name__}: {e}"))


class Plugin(exports.Plugin):
    def init(self, config: list[Pair]) -> None:
        try:
            settings = {"source": "plugboard"}
            for pair in config:
                if pair.key not in KNOWN_KEYS:
                    raise Err(HookError_BadConfig(f"unknown config key `{pair.key}` (known: {', '.join(KNOWN_KEYS)})"))
                if pair.key == "source":
                    source = pair.value.strip()
                    if not source:
                        raise Err(HookError_BadConfig("`source` must not be empty"))
                    settings["source"] = source
            _settings.update(settings)
            host.log(
                LogLevel.INFO,
                f"cloudevents ready: source {_settings['source']}",
                [Pair("source", _settings["source"])],
            )
        except Err:
            raise
        except Exception as e:
            raise _unexpected("init", e)


class WebhookFormatter(exports.WebhookFormatter):
    def format(self, event: Event) -> OutgoingRequest | None:
        try:
            cloudevent = to_cloudevent(event, _settings["source"])
            body = json.dumps(cloudevent, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            host.log(
                LogLevel.DEBUG,
                f"formatted {event.event_type} {event.id} as a CloudEvent ({len(body)} bytes)",
                [
                    Pair("event_id", event.id),
                    Pair("event_type", event.event_type),
                    Pair("endpoint", event.endpoint),
                ],
            )
            return OutgoingRequest(
                body=body,
                content_type=CONTENT_TYPE,
                headers=[],
                path_suffix=None,
                query=None,
            )
        except Err:
            raise
        except Exception as e:
            raise _unexpected("format", e)
